"""The background batch writer between the metering middleware and the database.

submit() only queues: the request path never waits for the database, and a request task being
cancelled on client disconnect cannot lose its event. A writer task takes
the queue in batches and writes up to `concurrent_writes` of them at once, each under a timeout. When a
write fails, its batch goes to the local spool (spool.py), and so do later batches, without trying the
database again, until the replay task, retrying with backoff, has written the spool back. One recorder
per worker process (the lifespan runs in each worker); workers may share a spool directory.

A crash loses at most the last moment. A batch is taken at most one flush interval after its first event
arrived. A write that has not committed half a flush interval after that has its batch copied to the
spool at once, while the write goes on: a copy held back from the replay, and deleted unread when the
write commits (replaying it cost the database the batch's insert a second time, and this process the
parsing, just when the database was slow already; spool.py). A batch that finds no write slot free
within that half interval (every write slow) is taken all the same and copied at once, then waits for a
slot. Slow is not down: later batches still go to the database, each with the same hedge. Only a write
that fails or times out (write_timeout_s: a database that does not answer) counts as an outage; the
copies are then the batches, and later batches go straight to the spool until the replay finds the
database back. So an event is in the database or the fsynced spool within about 1.5 flush intervals of
its call's end. (Taking a slow write, or a wait for a slot behind two, for an outage sent every event of
a loaded database through the spool: written, fsynced, read back and parsed, then written to the
database again, the parsing in a thread contending with the event loop.)

Events the database refuses outright (a NUL byte in a header value, a number out of range) would fail
every retry and wedge the spool, so a refused batch is split until the refused events are isolated;
those go to the spool directory's rejected.jsonl for an operator and are counted in events_rejected.

Logs never carry event contents, nor database error messages, whose DETAIL may quote a row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.events import Batch
from app.db.migrate import BEHIND, is_schema_error
from app.db.usage_writer import UsageWriter, is_rejected_data
from app.metering.spool import HeldCopy, Spool

log = logging.getLogger("gateway.metering.recorder")

# How often an idle recorder looks for spool files a crashed sibling worker left behind.
_RESCAN_S = 60.0
_LOSS_LOG_INTERVAL_S = 10.0


class Recorder:
    def __init__(
        self,
        engine: AsyncEngine,
        spool_dir: Path,
        *,
        max_queue: int = 100_000,
        batch_size: int = 2000,
        flush_interval_s: float = 0.2,
        write_timeout_s: float = 10.0,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 30.0,
        concurrent_writes: int = 2,
        spool_after_s: float | None = None,
        schema_behind_logged: bool = False,
    ) -> None:
        # A connection kept for each write that can be in flight, and one for the replay.
        self._usage = UsageWriter(engine, keep=concurrent_writes + 1)
        self._spool = Spool(spool_dir)
        self._max_queue = max_queue
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        self._write_timeout_s = write_timeout_s
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        # The queue: full batches waiting for a write slot, and the one being filled, its events as lines
        # in one buffer; _queued counts the events in both (submit() bounds it). Not a queue of objects:
        # those kept alive until the next write cost the request path several microseconds each on a
        # saturated core (events.py). Two asyncio events wake the writer rather than an asyncio.Queue's
        # put_nowait, which looks for getters to wake on every call.
        self._ready: deque[Batch] = deque()
        self._buffer = bytearray()
        self._buffered = 0
        # When the buffer got its first event: the batch is taken one flush interval after it.
        self._buffer_since = 0.0
        # How long a batch may wait for a write slot, and a write take, before the batch is spooled: half
        # a flush interval unless told (tests of other things, whose flush intervals are tiny, give more).
        self._hedge_s = flush_interval_s / 2 if spool_after_s is None else spool_after_s
        self._queued = 0
        self._has_events = asyncio.Event()
        # Two batches in flight keep both cores busy, Postgres on one while this process prepares the
        # next: bench/recorder_bench.py went from ~30k to ~50k events/s. SQLite has one writer at a time.
        sqlite = engine.dialect.name == "sqlite"
        self._write_slots = asyncio.Semaphore(1 if sqlite else concurrent_writes)
        self._inflight: dict[asyncio.Task[None], Batch] = {}
        self._db_ok = True
        self._closed = False
        self._replay_wanted = asyncio.Event()
        self._batch_ready = asyncio.Event()
        self._replay_offsets: dict[Path, int] = {}
        self._writer: asyncio.Task[None] | None = None
        self._replayer: asyncio.Task[None] | None = None
        # Counters for /metrics (app/metering/metrics.py reads stats()).
        self.events_written = 0
        self.write_errors = 0
        # Events copied to the spool (a slow write's batch's copy among them), and read back from it.
        self.events_spooled = 0
        self.events_replayed = 0
        self.events_rejected = 0
        self.events_lost = 0
        self._loss_logged_at = float("-inf")
        # The start-up check may have said already that the schema is behind: not again here.
        self._schema_logged = schema_behind_logged

    async def start(self) -> None:
        self._writer = asyncio.create_task(self._write_loop(), name="usage-recorder-writer")
        self._replayer = asyncio.create_task(self._replay_loop(), name="usage-recorder-replay")
        # A previous process may have left a spool behind.
        self._replay_wanted.set()

    def submit(self, line: bytes) -> None:
        """Never raises, never awaits, so it is safe from a request task being cancelled. With the queue
        full it writes the event's line to the spool file (the page cache, no fsync) instead."""
        try:
            if self._closed or self._queued >= self._max_queue:
                # Not fsynced here, which could block the event loop: the writer or the replay task
                # does it soon after (nobody does once closed, but the page cache outlives the process).
                self._spool.append(Batch(line, 1), sync=False)
                self.events_spooled += 1
                self._replay_wanted.set()
            else:
                self._buffer += line
                self._buffered += 1
                if self._buffered == 1:
                    self._buffer_since = time.monotonic()
                self._queued += 1
                if self._queued == 1:
                    self._has_events.set()
                if self._buffered >= self._batch_size:
                    self._ready.append(self._take_buffer())
                    self._batch_ready.set()
        except Exception as exc:
            self._lost(1, exc)

    async def close(self, timeout_s: float) -> None:
        """Write what is queued to the database, or to the spool when it cannot be written within
        timeout_s. The spool is replayed by the next start()."""
        if self._closed:
            return
        self._closed = True
        self._has_events.set()
        self._batch_ready.set()
        # A replay in progress is abandoned; its file stays and is replayed next time.
        await _cancel(self._replayer)
        # Try the database once more even if the replay task has not yet seen it come back.
        self._db_ok = True
        leftovers: list[Batch] = []
        if self._writer is not None:
            _, pending = await asyncio.wait({self._writer}, timeout=timeout_s)
            if pending:
                # Batches still being written are spooled too; one may yet commit, and its replay
                # will then insert nothing.
                leftovers = list(self._inflight.values())
                await _cancel(self._writer)
                for task in list(self._inflight):
                    await _cancel(task)
        leftovers += self._ready
        leftovers.append(self._take_buffer())
        self._ready.clear()
        self._queued = 0
        for batch in leftovers:
            if batch.size:
                await self._spool_batch(batch)
        await asyncio.to_thread(self._spool.seal)
        await self._usage.close()

    def queue_depth(self) -> int:
        return self._queued

    def spool_events(self) -> int:
        """Events in spool files this process wrote or is replaying, not yet in the database."""
        return self._spool.events()

    def spool_bytes(self) -> int:
        return self._spool.size_bytes()

    def stats(self) -> dict[str, float]:
        return {
            "queue_depth": self.queue_depth(),
            "spool_events": self.spool_events(),
            "spool_bytes": self.spool_bytes(),
            "write_errors": self.write_errors,
            "events_written": self.events_written,
            "events_spooled": self.events_spooled,
            "events_replayed": self.events_replayed,
            "events_rejected": self.events_rejected,
            "events_lost": self.events_lost,
        }

    async def _write_loop(self) -> None:
        while True:
            # A slot first, then a batch: a batch taken off the queue is in _inflight at once, so close()
            # can always find it.
            slot = await self._take_slot()
            batch, stop = await self._next_batch()
            if not slot and self._db_ok and not self._write_slots.locked():
                # The database came back, or a write finished, while this batch filled.
                await self._write_slots.acquire()
                slot = True
            if batch.size:
                task = asyncio.create_task(self._write_or_spool(batch, slot))
                self._inflight[task] = batch
                task.add_done_callback(self._inflight.pop)
            elif slot:
                self._write_slots.release()
            if self._spool.unsynced:
                await self._sync_spool()
            if stop:
                if self._inflight:
                    await asyncio.wait(set(self._inflight))
                return

    async def _take_slot(self) -> bool:
        """A write slot, or False when none frees up within half a flush interval (every write slow)
        or the database is taken to be away: the batch must not wait in memory for one."""
        if not self._db_ok:
            return False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._hedge_s):
                await self._write_slots.acquire()
                return True
        return False

    async def _next_batch(self) -> tuple[Batch, bool]:
        """A full batch (batch_size events) if one is waiting; else what is queued now plus what arrives
        within flush_interval_s of the first, or until a batch is full. True once closed and nothing is
        left.

        The batch fills while the writer sleeps: waking it for every event (a queue get under a timeout
        per event) cost more than the rest of the metering together (docs/performance-log.md, optimisation
        log). submit() and close() wake it early when a full batch is waiting, or to finish."""
        while not self._queued and not self._closed:
            self._has_events.clear()
            await self._has_events.wait()
        if not self._ready and not self._closed:
            self._batch_ready.clear()
            # From the batch's first event, not from now: however long the writer waited for a slot,
            # no event waits in the buffer for more than one flush interval.
            wait_s = self._buffer_since + self._flush_interval_s - time.monotonic()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(wait_s, 0)):
                    await self._batch_ready.wait()
        batch = self._ready.popleft() if self._ready else self._take_buffer()
        self._queued -= batch.size
        return batch, self._closed and not self._queued

    def _take_buffer(self) -> Batch:
        batch = Batch(bytes(self._buffer), self._buffered)
        self._buffer.clear()
        self._buffered = 0
        return batch

    async def _write_or_spool(self, batch: Batch, slot: bool) -> None:
        """Write the batch in a slot of its own, copied to the spool (held back from the replay) once it
        has waited half a flush interval for one or for the write, so that a crash cannot lose it;
        the copy is deleted unread when the write commits. Slow is not down: only a write that fails
        or times out is an outage, and then the copy, or the batch, goes to the replay."""
        held: HeldCopy | None = None
        try:
            if not slot and self._db_ok:
                held = await self._hold(batch)
                await self._write_slots.acquire()
                slot = True
            if not self._db_ok:
                if held is None:
                    await self._spool_for_replay(batch)
                return
            write = asyncio.ensure_future(self._store(batch))
            try:
                if held is None:
                    done, _ = await asyncio.wait({write}, timeout=self._hedge_s)
                    if not done:
                        held = await self._hold(batch)
                await write
            except Exception as exc:
                self.write_errors += 1
                self._outage(exc)
                if held is None:
                    await self._spool_for_replay(batch)
                return
            finally:
                write.cancel()
            if held is not None:
                await asyncio.to_thread(held.drop)
                held = None
        finally:
            if slot:
                self._write_slots.release()
            if held is not None:
                # The write failed, the database is away, or the recorder is closing: the copy is the
                # batch now, and the replay writes it.
                held.release()
                self._replay_wanted.set()

    async def _hold(self, batch: Batch) -> HeldCopy | None:
        try:
            held = await asyncio.to_thread(self._spool.hold, batch)
        except Exception as exc:
            # Not lost yet: the write goes on, and a failed one spools the batch again.
            log.error("a slow usage write's batch could not be copied to the spool (%s)", _describe(exc))
            return None
        self.events_spooled += batch.size
        return held

    def _outage(self, exc: Exception) -> None:
        if self._db_ok:
            self._db_ok = False
            self._log_failure("usage write failed (%s); spooling until the database is back", exc)

    async def _spool_for_replay(self, batch: Batch) -> None:
        await self._spool_batch(batch)
        self._replay_wanted.set()

    async def _store(self, batch: Batch) -> None:
        """Write a batch, rejecting the events the database refuses; raises when it is unavailable."""
        try:
            async with asyncio.timeout(self._write_timeout_s):
                inserted = await self._usage.write(batch)
        except Exception as exc:
            if not is_rejected_data(exc):
                raise
            if batch.size == 1:
                await self._reject(batch, exc)
            else:
                for half in batch.halves():
                    await self._store(half)
        else:
            # Not `+= await self._usage.write(...)`, which reads the counter before the await and so loses
            # what the other task (writer or replay) added meanwhile.
            self.events_written += inserted
            # Written: should the schema fall behind again, that is news again.
            self._schema_logged = False

    async def _reject(self, batch: Batch, exc: Exception) -> None:
        log.error(
            "the database refused a usage event (%s); kept in the spool's rejected file", _describe(exc)
        )
        try:
            await asyncio.to_thread(self._spool.reject, batch)
        except Exception as write_exc:
            self._lost(batch.size, write_exc)
            return
        self.events_rejected += batch.size

    async def _spool_batch(self, batch: Batch) -> None:
        try:
            await asyncio.to_thread(self._spool.append, batch)
        except Exception as exc:
            self._lost(batch.size, exc)
            return
        self.events_spooled += batch.size

    def _lost(self, count: int, exc: Exception) -> None:
        self.events_lost += count
        # At most one line per interval: with the disk full, submit() fails for every request.
        now = time.monotonic()
        if now - self._loss_logged_at >= _LOSS_LOG_INTERVAL_S:
            self._loss_logged_at = now
            log.error(
                "usage events lost, %d so far: the spool cannot be written (%s)",
                self.events_lost,
                _describe(exc),
            )

    async def _sync_spool(self) -> None:
        try:
            await asyncio.to_thread(self._spool.sync)
        except Exception as exc:
            log.error("usage spool fsync failed (%s)", _describe(exc))

    async def _replay_loop(self) -> None:
        delay = self._retry_initial_s
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_RESCAN_S):
                    await self._replay_wanted.wait()
            self._replay_wanted.clear()
            try:
                await self._replay_all()
            except Exception as exc:
                self.write_errors += 1
                # Jitter so that the workers of a restarted deployment do not retry in lockstep.
                pause = delay * random.uniform(0.5, 1.0)
                self._log_failure(f"usage spool replay failed (%s); retrying in {pause:.1f}s", exc)
                self._replay_wanted.set()
                await asyncio.sleep(pause)
                delay = min(delay * 2, self._retry_max_s)
            else:
                self._db_ok = True
                delay = self._retry_initial_s

    def _log_failure(self, message: str, exc: Exception) -> None:
        """A write that failed for want of a table or column fails the same way on every retry until
        someone migrates: that is said once, not at every retry."""
        if not is_schema_error(exc):
            log.warning(message, _describe(exc))
        elif not self._schema_logged:
            self._schema_logged = True
            log.error("usage not written: database %s; usage is kept in the spool until then", BEHIND)

    async def _replay_all(self) -> None:
        await self._replay_sealed()
        # Sealed only once the older files went through: while the database is down each attempt
        # would otherwise leave one more small file behind.
        if self._spool.has_active_events():
            await asyncio.to_thread(self._spool.seal)
            await self._replay_sealed()

    async def _replay_sealed(self) -> None:
        for path in await asyncio.to_thread(self._spool.sealed_files):
            claimed = await asyncio.to_thread(self._spool.claim, path)
            if claimed is None:
                continue
            with claimed:
                # Resumed where the last attempt stopped, not from the start; only this process knows
                # the offset, so a restart replays the whole file (duplicates are skipped).
                offset = self._replay_offsets.get(path, 0)
                while True:
                    batch, end, malformed = await asyncio.to_thread(
                        claimed.read_batch, offset, self._batch_size
                    )
                    if end == offset:
                        break
                    if malformed:
                        log.warning("skipped %d malformed lines in %s", malformed, path.name)
                    if batch.size:
                        await self._store(batch)
                        self.events_replayed += batch.size
                    claimed.replayed(batch.size + malformed)
                    offset = self._replay_offsets[path] = end
                await asyncio.to_thread(claimed.remove)
                self._replay_offsets.pop(path, None)


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None and not task.done():
        task.cancel()
        await asyncio.wait({task})


def _describe(exc: BaseException) -> str:
    """The exception's type and SQLSTATE, never its message: a Postgres DETAIL can quote a row."""
    sqlstate = getattr(exc, "sqlstate", None) or getattr(getattr(exc, "orig", None), "sqlstate", None)
    name = type(exc).__name__
    return f"{name} {sqlstate}" if sqlstate else name
