"""The local append-only spool, where usage events wait while the database cannot take them.

A spool file holds one event per line (UsageEvent.to_line), in files named usage-*.ndjson; files of older
versions, usage-*.jsonl, hold one JSON object per event and are replayed as well. The new name keeps a
gateway rolled back to an older version from reading lines it cannot parse (it would skip them as torn):
it leaves them for the newer version instead. A process appends only to its own *active* file and holds an
exclusive flock on it for as long as it writes to it; a file nobody holds a lock on is *sealed*, and any
process may replay it, so the spool of a crashed worker is replayed by whichever process looks next
(the kernel drops a dead process's locks). Replaying never edits a file: it is deleted only once every
event in it is in the database, so a crash mid-replay means replaying it again, and the duplicates that
makes are harmless because inserts are idempotent on request_id.

A batch whose database write is slow has a copy of its own (hold()): a file this process keeps locked,
so that no replayer takes it while the write may still commit; it is deleted unread once the write
commits, and left to the replay when it fails (or when the process dies, the kernel dropping its lock).

Blocking file I/O throughout: the recorder calls these methods through asyncio.to_thread, except for
the overflow path (Recorder.submit), which writes a line without fsync.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from app.db.events import Batch, UsageEvent

_PREFIX = "usage-"
_SUFFIX = ".ndjson"
# What versions before lines wrote; replayed, never written.
_OLD_SUFFIX = ".jsonl"
# Not a spool file: events the database refused (see Recorder), kept for an operator, never replayed.
REJECTED_FILE = "rejected.jsonl"


class Spool:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        # _lock guards the active file and the counts; _sync_lock orders fsync against close. A writer
        # (the overflow path runs on the event loop) only ever waits for _lock, never for an fsync.
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._unsynced = False
        self._dir_unsynced = False
        # Events per spool file this process wrote or claimed and has not replayed yet (for stats).
        self._counts: dict[Path, int] = {}

    def append(self, batch: Batch, *, sync: bool = True) -> None:
        data = batch.data
        with self._lock:
            if self._fd is None:
                self._open_active()
            assert self._fd is not None and self._path is not None
            try:
                _write_all(self._fd, data)
            except OSError:
                # A partial line would glue itself to the next append's first line and spoil both.
                os.ftruncate(self._fd, self._size)
                raise
            self._size += len(data)
            self._counts[self._path] = self._counts.get(self._path, 0) + batch.size
            self._unsynced = True
        if sync:
            self.sync()

    def sync(self) -> None:
        with self._sync_lock:
            with self._lock:
                fd, unsynced, dir_unsynced = self._fd, self._unsynced, self._dir_unsynced
                self._unsynced = self._dir_unsynced = False
            # Safe outside _lock: the fd cannot be closed meanwhile, seal() needs _sync_lock.
            if fd is not None and unsynced:
                os.fsync(fd)
            if dir_unsynced:
                _fsync_dir(self.directory)

    @property
    def unsynced(self) -> bool:
        return self._unsynced or self._dir_unsynced

    def has_active_events(self) -> bool:
        with self._lock:
            return self._path is not None and self._counts.get(self._path, 0) > 0

    def seal(self) -> None:
        """Close the active file, making it replayable; the next append starts a new one."""
        with self._sync_lock:
            with self._lock:
                fd, self._fd, self._path = self._fd, None, None
                unsynced, dir_unsynced = self._unsynced, self._dir_unsynced
                self._unsynced = self._dir_unsynced = False
            if fd is None:
                return
            try:
                if unsynced:
                    os.fsync(fd)
                if dir_unsynced:
                    _fsync_dir(self.directory)
            finally:
                os.close(fd)

    def hold(self, batch: Batch) -> HeldCopy:
        """A copy of `batch` in a file of its own, fsynced, and locked until drop() or release()."""
        fd, path = self._new_locked_file()
        try:
            _write_all(fd, batch.data)
            os.fsync(fd)
            _fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        with self._lock:
            self._counts[path] = batch.size
        return HeldCopy(self, path, fd)

    def sealed_files(self) -> list[Path]:
        """Oldest first: the names start with the creation time."""
        with self._lock:
            active = self._path
        files = sorted(p for p in self._files() if p != active)
        with self._lock:
            # A file this process began to replay may have been finished by another process since.
            for gone in self._counts.keys() - {*files, active, self._path}:
                del self._counts[gone]
        return files

    def claim(self, path: Path) -> ClaimedFile | None:
        """Lock a sealed file for replay; None when another process holds it or it is gone."""
        try:
            f = path.open("rb")
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The lock may have been won on a file another replayer has finished with and deleted.
            if os.stat(path).st_ino != os.fstat(f.fileno()).st_ino:
                f.close()
                return None
        except (BlockingIOError, FileNotFoundError):
            f.close()
            return None
        with self._lock:
            known = path in self._counts
        if not known:
            count = _count_lines(f)
            with self._lock:
                self._counts[path] = count
        return ClaimedFile(self, path, f)

    def reject(self, batch: Batch) -> None:
        path = self.directory / REJECTED_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            # Objects with field names: this file is for an operator to read.
            _write_all(fd, b"".join(e.to_json() + b"\n" for e in batch.events()))
            os.fsync(fd)
        finally:
            os.close(fd)

    def events(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def size_bytes(self) -> int:
        total = 0
        for p in self._files():
            try:
                total += p.stat().st_size
            except FileNotFoundError:
                continue
        return total

    def _files(self) -> list[Path]:
        # Both kinds sort together by the creation time their names start with.
        return [p for suffix in (_SUFFIX, _OLD_SUFFIX) for p in self.directory.glob(f"{_PREFIX}*{suffix}")]

    def _replayed(self, path: Path, count: int) -> None:
        with self._lock:
            if path in self._counts:
                self._counts[path] = max(0, self._counts[path] - count)

    def _removed(self, path: Path) -> None:
        with self._lock:
            self._counts.pop(path, None)

    def _open_active(self) -> None:
        fd, path = self._new_locked_file()
        self._fd, self._path, self._size = fd, path, 0
        self._counts[path] = 0
        self._dir_unsynced = True

    def _new_locked_file(self) -> tuple[int, Path]:
        name = f"{_PREFIX}{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}"
        staging = self.directory / f"{name}.open"
        path = self.directory / f"{name}{_SUFFIX}"
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Created under another name and renamed once locked: a replayer that saw the file unlocked
            # for an instant would claim it, find it empty and delete it while we append to it.
            os.rename(staging, path)
        except BaseException:
            os.close(fd)
            staging.unlink(missing_ok=True)
            raise
        return fd, path


class HeldCopy:
    """A batch's copy in a spool file this process holds the lock on (Spool.hold)."""

    def __init__(self, spool: Spool, path: Path, fd: int) -> None:
        self._spool = spool
        self._path = path
        self._fd: int | None = fd

    def drop(self) -> None:
        """The write committed: the copy goes unread. Deleted before its lock goes, so no replayer
        can take it meanwhile."""
        try:
            self._path.unlink(missing_ok=True)
        finally:
            self.release()
            self._spool._removed(self._path)

    def release(self) -> None:
        """The copy stays, for the replay, like any sealed file."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # releases the lock


class ClaimedFile:
    """A sealed spool file this process holds the lock on, read in batches from a byte offset."""

    def __init__(self, spool: Spool, path: Path, f: BinaryIO) -> None:
        self.path = path
        self._spool = spool
        self._f = f

    def read_batch(self, offset: int, max_events: int) -> tuple[Batch, int, int]:
        """Up to max_events events from offset: (the batch, offset after it, malformed lines skipped).
        A malformed line is the torn tail a crash mid-append leaves. Each line is parsed and written
        again, so the batch holds only well-formed lines of the current form."""
        self._f.seek(offset)
        events: list[UsageEvent] = []
        malformed = 0
        while len(events) < max_events:
            line = self._f.readline()
            if not line:
                break
            offset += len(line)
            try:
                events.append(UsageEvent.from_line(line))
            except ValueError:
                malformed += 1
        return Batch.of(events), offset, malformed

    def replayed(self, count: int) -> None:
        self._spool._replayed(self.path, count)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        _fsync_dir(self.path.parent)
        self._spool._removed(self.path)

    def close(self) -> None:
        self._f.close()  # releases the lock

    def __enter__(self) -> ClaimedFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _count_lines(f: BinaryIO) -> int:
    count = 0
    while chunk := f.read(1 << 20):
        count += chunk.count(b"\n")
    f.seek(0)
    return count
