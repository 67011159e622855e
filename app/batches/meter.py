"""Batch jobs are metered: one usage row per request line of a batch created through the gateway.

`POST /v1/batches` answered, the passthrough hands the new batch to `track()` with the creating call's
key, feature and user; a background task writes it to `batch_jobs`. The same task polls the batches not
metered yet, with backoff (GATEWAY_BATCH_POLL_INITIAL_S doubling up to GATEWAY_BATCH_POLL_MAX_S), and a
client retrieving a batch that has ended (`found()`) has it metered at once. Neither `track()` nor
`found()` awaits anything: the request path never waits on the database or on this task.

Metering a batch that has ended reads its output and error files (streamed, at most
GATEWAY_BATCH_MAX_FILE_BYTES of each) and writes a row per line: `endpoint='/v1/batches'`, `request_id`
the batch id and the line's `custom_id`, tokens from the line's `response.body.usage`, cost at the model's
batch rate. Exactly once across restarts and replicas: the rows go through the recorder's own writer,
whose `ON CONFLICT (request_id) DO NOTHING` adds to `usage_daily` only the rows it inserted, so a batch
metered twice (a lease expired, two replicas) counts each line once. The lease (`metering_until`) and the
poll claim (a compare-and-set on `next_poll_at`) only keep replicas from doing the same work twice.

The batch's cost also counts against its owner's live budgets (key, feature, user; this day and month),
once: charged by the process whose compare-and-set closes the job (`metered_at` from NULL), with the cost
of every line it priced, whether this process or one before it wrote the rows.

A process killed between forwarding `POST /v1/batches` and writing the new batch's `batch_jobs` row does
not lose the batch: before it forwards, the passthrough writes an intent (`intend()`: who pays, the input
file, when) to an fsynced file under GATEWAY_DATA_DIR/batch-intents, locked (flock) while the process
lives; the file goes once the row is written, or at once when the upstream refuses the batch. A
metering round finds the intents no living process holds, lists the upstream's batches created since, and
tracks the one made from the intent's input file that no row holds yet; an intent matching nothing for
_INTENT_LIFE_S was never created upstream and is dropped. Not guaranteed: lines past the file cap are not
metered (the row says `truncated`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import orjson
from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from app.call.admission import charge_to
from app.call.record import CallRecord, Usage
from app.db.events import MAX_MODEL_CHARS, Batch, UsageEvent, is_model_name
from app.db.migrate import is_schema_error
from app.db.models import batch_jobs
from app.db.usage_writer import is_rejected_data, write_batch
from app.edge.canonical_path import upstream_path
from app.errors import GatewayError
from app.limits.guard import Guard
from app.live_config import ConfigHolder
from app.metering.pricing import PriceTable
from app.proxy.targets import UpstreamTarget
from app.proxy.upstream import UpstreamClient, UpstreamUnavailable
from app.wire.openai import usage_of

log = logging.getLogger("gateway.metering.batches")

ENDPOINT: Final = "/v1/batches"
TERMINAL: Final = frozenset({"completed", "failed", "expired", "cancelled"})
# Bounds on what waits in memory for the background task; past them a batch is dropped with a warning.
_MAX_PENDING: Final = 10_000
# Batches polled per round, and usage rows per write.
_CLAIM: Final = 20
_ROWS_PER_WRITE: Final = 1000
# A custom_id longer than this, or not printable, is keyed by its hash.
_MAX_CUSTOM_ID: Final = 256
# An intent no batch matches after this long was refused or never sent; the upstream's list is read back
# this far (and the clocks' difference) at most, a bounded number of pages.
_INTENT_LIFE_S: Final = 600.0
_LIST_PAGES: Final = 20


@dataclass(frozen=True, slots=True)
class BatchSettings:
    poll_initial_s: float
    poll_max_s: float
    lease_s: float
    max_file_bytes: int


@dataclass(frozen=True, slots=True)
class _Owner:
    api_key_id: str | None
    feature: str | None
    user_id: str | None


class Intent:
    """A batch about to be created: its file, held locked by this process until it is tracked or dropped."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self, *, drop: bool) -> None:
        """Unlocked (so a metering round may recover it), and removed when `drop`."""
        if drop:
            with contextlib.suppress(OSError):
                self.path.unlink()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _write_intent(directory: Path, record: dict[str, Any]) -> Intent:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{uuid.uuid4().hex}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, orjson.dumps(record))
        os.fsync(fd)
        # The file's name must outlive a crash too.
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    return Intent(path, fd)


def _orphans(directory: Path) -> list[tuple[int, Path, dict[str, Any]]]:
    """The intents no living process holds, each locked now by this one (fd, path, record)."""
    found: list[tuple[int, Path, dict[str, Any]]] = []
    with contextlib.suppress(FileNotFoundError):
        for path in sorted(directory.glob("*.json")):
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # Gone while this waited for it: another process recovered it and removed it.
                record = orjson.loads(path.read_bytes()) if path.exists() else None
            except (OSError, orjson.JSONDecodeError):
                os.close(fd)
                continue
            if isinstance(record, dict):
                found.append((fd, path, record))
            else:
                os.close(fd)
    return found


def _now() -> datetime:
    return datetime.now(UTC)


def _dialect_insert(engine: AsyncEngine) -> Any:
    return postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert


class BatchMeter:
    def __init__(
        self,
        engine: AsyncEngine,
        upstream: UpstreamClient,
        config: ConfigHolder,
        settings: BatchSettings,
        guard: Guard | None = None,
        intents: Path | None = None,
    ) -> None:
        self._engine = engine
        self._guard = guard
        self._intents = intents
        self._upstream = upstream
        self._config = config
        self._settings = settings
        self._tracked: list[dict[str, Any]] = []
        # Intents whose batches are in _tracked: dropped once their rows are written.
        self._written_intents: list[Intent] = []
        self._recover_after = 0.0
        self._found: dict[str, dict[str, Any]] = {}
        # Batches this process metered: a client retrieving one again and again costs no query. Only a
        # hint, bounded; the database decides.
        self._metered: OrderedDict[str, None] = OrderedDict()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # For /metrics.
        self.lines_metered = 0
        self.errors = 0

    def _target(self) -> UpstreamTarget:
        return self._config.current.policy.default_target

    def stats(self) -> dict[str, float]:
        return {
            "pending": len(self._tracked) + len(self._found),
            "lines_metered": self.lines_metered,
            "errors": self.errors,
        }

    # -- the request path: never awaits -------------------------------------------------------------

    async def intend(self, call: CallRecord, body: bytes) -> Intent | None:
        """Before `POST /v1/batches` goes upstream: who pays for the batch it may create, on disk. The one
        wait on the request path here, an fsync (off the event loop), for an endpoint called rarely."""
        if self._intents is None:
            return None
        try:
            request: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        input_file = request.get("input_file_id") if isinstance(request, dict) else None
        if not isinstance(input_file, str):
            return None  # refused upstream: nothing will be created
        record = {
            "input_file_id": input_file,
            "api_key_id": call.admitted.api_key_id,
            "feature": call.admitted.feature,
            "user_id": call.admitted.user_id,
            "at": time.time(),
            "upstream": self._target().base_url,
        }
        try:
            return await asyncio.to_thread(_write_intent, self._intents, record)
        except OSError:
            log.warning("batch intent not written; this batch is tracked from its answer only")
            return None

    def track(self, batch: dict[str, Any], call: CallRecord, intent: Intent | None = None) -> None:
        """A batch the gateway just created, and who pays for it."""
        batch_id = batch.get("id")
        if not isinstance(batch_id, str) or len(self._tracked) >= _MAX_PENDING:
            log.warning("batch not tracked for metering (queue full or no id)")
            if intent is not None:
                intent.release(drop=False)
            return
        owner = _Owner(call.admitted.api_key_id, call.admitted.feature, call.admitted.user_id)
        self._track(batch_id, batch.get("status"), owner, intent)

    def _track(self, batch_id: str, status: object, owner: _Owner, intent: Intent | None) -> None:
        self._tracked.append(
            {
                "batch_id": batch_id,
                "api_key_id": owner.api_key_id,
                "feature": owner.feature,
                "user_id": owner.user_id,
                "created_at": _now(),
                "status": status if isinstance(status, str) else "validating",
                "next_poll_at": _now() + timedelta(seconds=self._settings.poll_initial_s),
                "upstream": self._target().base_url,
            }
        )
        if intent is not None:
            self._written_intents.append(intent)
        self._wake.set()

    def found(self, batch: dict[str, Any]) -> None:
        """A batch a client retrieved: metered now if it has ended (and was created through the gateway)."""
        batch_id = batch.get("id")
        if (
            batch.get("status") in TERMINAL
            and isinstance(batch_id, str)
            and batch_id not in self._metered
            and len(self._found) < _MAX_PENDING
        ):
            self._found[batch_id] = batch
            self._wake.set()

    # -- the background task ------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="batch-metering")

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task})
        # What was created but not yet written is written now, if the database takes it.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self._write_tracked()

    async def _loop(self) -> None:
        pause = self._settings.poll_initial_s
        while True:
            self._wake.clear()
            try:
                await self._recover_intents()
                await self._write_tracked()
                await self._meter_found()
                await self._poll_due()
                wait = await self._until_next_poll()
                pause = self._settings.poll_initial_s
            except Exception as exc:
                # Database or upstream unavailable: try again later, backing off. A schema that is
                # behind fails every round the same way until someone migrates; start-up and /readyz
                # have said so once already.
                self.errors += 1
                if not is_schema_error(exc):
                    log.warning("batch metering round failed (%s)", type(exc).__name__)
                wait = pause = min(pause * 2, self._settings.poll_max_s)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def _write_tracked(self) -> None:
        if not self._tracked:
            return
        rows, self._tracked = self._tracked, []
        intents, self._written_intents = self._written_intents, []
        insert = _dialect_insert(self._engine)(batch_jobs).on_conflict_do_nothing(
            index_elements=[batch_jobs.c.batch_id]
        )
        try:
            async with self._engine.begin() as conn:
                await conn.execute(insert, rows)
        except BaseException:
            self._tracked[:0] = rows[: _MAX_PENDING - len(self._tracked)]
            self._written_intents[:0] = intents
            raise
        for intent in intents:
            intent.release(drop=True)

    async def _recover_intents(self) -> None:
        """Intents a process left when it died: their batches found in the upstream's list and tracked."""
        if self._intents is None or time.monotonic() < self._recover_after:
            return
        orphans = await asyncio.to_thread(_orphans, self._intents)
        if not orphans:
            return
        # An intent the upstream's list does not explain yet is looked for again one longest poll later,
        # not every round.
        self._recover_after = time.monotonic() + self._settings.poll_max_s
        try:
            since = min(float(record.get("at") or 0) for _, _, record in orphans) - _INTENT_LIFE_S
            listed = await self._list_batches(since)
            async with self._engine.connect() as conn:
                known = set(
                    (
                        await conn.execute(
                            select(batch_jobs.c.batch_id).where(
                                batch_jobs.c.batch_id.in_([b["id"] for b in listed])
                            )
                        )
                    ).scalars()
                )
            for fd, path, record in orphans:
                made = [
                    b
                    for b in listed
                    if b["id"] not in known
                    and b.get("input_file_id") == record.get("input_file_id")
                    and float(b.get("created_at") or 0) >= float(record.get("at") or 0) - _INTENT_LIFE_S
                ]
                intent = Intent(path, fd)
                if made:
                    # The oldest: an intent is written before its batch is created, in the order they go.
                    batch = min(made, key=lambda b: float(b.get("created_at") or 0))
                    known.add(batch["id"])
                    owner = _Owner(record.get("api_key_id"), record.get("feature"), record.get("user_id"))
                    self._track(batch["id"], batch.get("status"), owner, intent)
                    log.info("recovered a batch whose creating process died before tracking it")
                elif time.time() - float(record.get("at") or 0) > _INTENT_LIFE_S:
                    intent.release(drop=True)
                else:
                    intent.release(drop=False)
            orphans = []
        finally:
            for fd, _, _ in orphans:
                os.close(fd)

    async def _list_batches(self, since: float) -> list[dict[str, Any]]:
        """The upstream's batches created since `since` (UNIX time), newest first, at most _LIST_PAGES."""
        found: list[dict[str, Any]] = []
        after = ""
        for _ in range(_LIST_PAGES):
            query = "limit=100" + (f"&after={quote(after, safe='')}" if after else "")
            code, page = await self._get(upstream_path("batches") + "?" + query)
            data = page.get("data") if page is not None else None
            if not isinstance(data, list):
                raise UpstreamUnavailable("status", f"listing batches answered {code}")
            batches = [b for b in data if isinstance(b, dict) and isinstance(b.get("id"), str)]
            found += batches
            if not batches or page is None or page.get("has_more") is not True:
                break
            if min(float(b.get("created_at") or 0) for b in batches) < since:
                break
            after = batches[-1]["id"]
        return found

    async def _meter_found(self) -> None:
        found, self._found = self._found, {}
        for batch_id, batch in found.items():
            await self._meter(batch_id, batch)

    async def _until_next_poll(self) -> float:
        async with self._engine.connect() as conn:
            earliest = await conn.scalar(
                select(func.min(batch_jobs.c.next_poll_at)).where(
                    batch_jobs.c.metered_at.is_(None), self._polled_here()
                )
            )
        if earliest is None:
            return self._settings.poll_max_s
        seconds: float = (earliest - _now()).total_seconds()
        return min(max(seconds, 0.01), self._settings.poll_max_s)

    async def _poll_due(self) -> None:
        now = _now()
        async with self._engine.connect() as conn:
            due = (
                await conn.execute(
                    select(batch_jobs.c.batch_id, batch_jobs.c.polls, batch_jobs.c.next_poll_at)
                    .where(
                        batch_jobs.c.metered_at.is_(None),
                        batch_jobs.c.next_poll_at <= now,
                        self._polled_here(),
                    )
                    .order_by(batch_jobs.c.next_poll_at)
                    .limit(_CLAIM)
                )
            ).all()
        for batch_id, polls, next_poll_at in due:
            if await self._claim_poll(batch_id, polls, next_poll_at):
                await self._poll(batch_id)

    def _polled_here(self) -> ColumnElement[bool]:
        """The batches this gateway's upstream holds. One created at another upstream (the setting changed,
        or another deployment shares the database) waits for a gateway that sends there."""
        return or_(batch_jobs.c.upstream.is_(None), batch_jobs.c.upstream == self._target().base_url)

    async def _claim_poll(self, batch_id: str, polls: int, next_poll_at: datetime) -> bool:
        """Move the batch's next poll forward, unless another process or replica did first."""
        backoff = min(self._settings.poll_initial_s * 2 ** min(polls + 1, 30), self._settings.poll_max_s)
        later = _now() + timedelta(seconds=backoff * random.uniform(0.8, 1.0))
        async with self._engine.begin() as conn:
            claimed = await conn.execute(
                update(batch_jobs)
                .where(
                    batch_jobs.c.batch_id == batch_id,
                    batch_jobs.c.next_poll_at == next_poll_at,
                    batch_jobs.c.metered_at.is_(None),
                )
                .values(next_poll_at=later, polls=batch_jobs.c.polls + 1)
            )
        return claimed.rowcount == 1

    async def _poll(self, batch_id: str) -> None:
        try:
            code, answer = await self._get(upstream_path("batches", batch_id))
        except (UpstreamUnavailable, GatewayError) as exc:
            log.warning("batch poll failed (%s)", type(exc).__name__)
            return
        if code == 404:
            # The upstream does not know it (any more): nothing will ever be read, so stop polling it.
            await self._close_job(batch_id, status="not_found", lines=0, truncated=False)
            return
        if answer is None:
            return
        status = answer.get("status")
        if status in TERMINAL:
            await self._meter(batch_id, answer)
        elif isinstance(status, str):
            async with self._engine.begin() as conn:
                await conn.execute(
                    update(batch_jobs).where(batch_jobs.c.batch_id == batch_id).values(status=status[:64])
                )

    async def _get(self, path: str) -> tuple[int, dict[str, Any] | None]:
        call = CallRecord(request_id=f"batch-meter-{uuid.uuid4().hex}", method="GET", path=path)
        answer = await self._upstream.send(self._target(), "GET", path, body=b"", headers={}, call=call)
        if answer.status >= 300:
            return answer.status, None
        try:
            parsed: Any = orjson.loads(answer.body)
        except orjson.JSONDecodeError:
            return answer.status, None
        return answer.status, parsed if isinstance(parsed, dict) else None

    # -- metering one batch ---------------------------------------------------------------------------

    async def _meter(self, batch_id: str, batch: dict[str, Any]) -> None:
        owner = await self._lease(batch_id)
        # Whatever the lease says, retrievals need not ask again: should this process fail to meter
        # it, or the one holding the lease die, the polls come back to it.
        self._metered[batch_id] = None
        if len(self._metered) > _MAX_PENDING:
            self._metered.popitem(last=False)
        if owner is None:
            return  # metered already, being metered elsewhere, or not created through the gateway
        try:
            lines, truncated, cost_units = await self._meter_files(batch_id, batch, owner)
        except BaseException:
            # Let the next poll try again soon rather than when the lease runs out.
            with contextlib.suppress(Exception):
                async with self._engine.begin() as conn:
                    await conn.execute(
                        update(batch_jobs)
                        .where(batch_jobs.c.batch_id == batch_id)
                        .values(metering_until=None)
                    )
            raise
        closed = await self._close_job(
            batch_id, status=str(batch.get("status"))[:64], lines=lines, truncated=truncated
        )
        if closed and cost_units and self._guard is not None:
            charged = charge_to(owner.api_key_id, owner.feature, owner.user_id)
            if charged is not None:
                self._guard.settle(charged, 0, cost_units)
        if truncated:
            log.warning("batch output larger than GATEWAY_BATCH_MAX_FILE_BYTES: later lines not metered")

    async def _close_job(self, batch_id: str, *, status: str, lines: int, truncated: bool) -> bool:
        """False when another process closed it first (and charged its budgets)."""
        async with self._engine.begin() as conn:
            closed = await conn.execute(
                update(batch_jobs)
                .where(batch_jobs.c.batch_id == batch_id, batch_jobs.c.metered_at.is_(None))
                .values(
                    metered_at=_now(),
                    metering_until=None,
                    metered_lines=lines,
                    truncated=truncated,
                    status=status,
                )
            )
        return closed.rowcount == 1

    async def _lease(self, batch_id: str) -> _Owner | None:
        now = _now()
        async with self._engine.begin() as conn:
            row = (
                await conn.execute(
                    update(batch_jobs)
                    .where(
                        batch_jobs.c.batch_id == batch_id,
                        batch_jobs.c.metered_at.is_(None),
                        (batch_jobs.c.metering_until.is_(None)) | (batch_jobs.c.metering_until < now),
                    )
                    .values(metering_until=now + timedelta(seconds=self._settings.lease_s))
                    .returning(batch_jobs.c.api_key_id, batch_jobs.c.feature, batch_jobs.c.user_id)
                )
            ).first()
        return None if row is None else _Owner(*row)

    async def _meter_files(
        self, batch_id: str, batch: dict[str, Any], owner: _Owner
    ) -> tuple[int, bool, int]:
        """(rows written, truncated, the cost of every line priced, in 1e-10 USD)."""
        ended = _ended_at(batch)
        # One reading of the configuration for the whole batch, whatever a reload puts in force meanwhile.
        config = self._config.current
        prices = config.prices
        written, truncated, cost_units = 0, False, 0
        for name in ("output_file_id", "error_file_id"):
            file_id = batch.get(name)
            if not isinstance(file_id, str) or not file_id:
                continue
            events: list[UsageEvent] = []
            reader = _FileLines(self._settings.max_file_bytes)
            async for line in reader.read(self._upstream, config.policy.default_target, file_id):
                event = line_event(batch_id, line, owner, ended, prices)
                if event is not None:
                    events.append(event)
                    cost_units += event.cost_units or 0
                if len(events) >= _ROWS_PER_WRITE:
                    written, events = written + await self._write(events), []
            if events:
                written += await self._write(events)
            truncated = truncated or reader.truncated
        return written, truncated, cost_units

    async def _write(self, events: list[UsageEvent]) -> int:
        """The lines' rows; those the database refuses (a token count out of range, say) are left out,
        one by one, rather than failing every attempt at the batch. Returns how many were written."""
        try:
            await write_batch(self._engine, Batch.of(events))
            self.lines_metered += len(events)
            return len(events)
        except Exception as exc:
            if not is_rejected_data(exc):
                raise
        if len(events) > 1:
            return sum([await self._write([event]) for event in events])
        log.error("the database refused a batch line's usage row; left out")
        return 0


class _FileLines:
    """The JSON lines of a file's content, streamed, at most `limit` bytes of it."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self.truncated = False

    async def read(
        self, upstream: UpstreamClient, target: UpstreamTarget, file_id: str
    ) -> AsyncIterator[dict[str, Any]]:
        path = upstream_path("files", file_id, "content")
        call = CallRecord(request_id=f"batch-meter-{uuid.uuid4().hex}", method="GET", path=path)
        answer = await upstream.send(
            target, "GET", path, body=b"", headers={}, call=call, keep_open=lambda _: True
        )
        stream = answer.stream
        try:
            if answer.status >= 300:
                raise UpstreamUnavailable("status", f"batch file answered {answer.status}")
            pending = bytearray()
            seen = 0
            chunk: bytes | None = answer.body
            while chunk is not None:
                seen += len(chunk)
                if seen > self._limit:
                    self.truncated = True
                    chunk = chunk[: len(chunk) - (seen - self._limit)]
                pending += chunk
                *complete, rest = pending.split(b"\n")
                pending = bytearray(rest)
                for raw in complete:
                    parsed = _parse(raw)
                    if parsed is not None:
                        yield parsed
                if self.truncated:
                    return
                chunk = await stream.read() if stream is not None else None
            parsed = _parse(pending)
            if parsed is not None:
                yield parsed
        finally:
            if stream is not None:
                await stream.close()


def _parse(raw: bytes | bytearray) -> dict[str, Any] | None:
    if not raw.strip():
        return None
    try:
        parsed: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _ended_at(batch: dict[str, Any]) -> datetime:
    for name in ("completed_at", "failed_at", "expired_at", "cancelled_at"):
        moment = batch.get(name)
        if type(moment) is int and moment > 0:
            with contextlib.suppress(OverflowError, OSError, ValueError):
                return datetime.fromtimestamp(moment, UTC)
    return _now()


def line_key(batch_id: str, custom_id: object) -> str:
    """The usage row's unique key for one line: the batch id and the line's custom_id (unique in a batch,
    by OpenAI's rules), or its hash when it is no short printable string."""
    if isinstance(custom_id, str) and 0 < len(custom_id) <= _MAX_CUSTOM_ID and custom_id.isprintable():
        return f"{batch_id}:{custom_id}"
    digest = hashlib.sha256(orjson.dumps(custom_id)).hexdigest()[:32]
    return f"{batch_id}:#{digest}"


def line_event(
    batch_id: str, line: dict[str, Any], owner: _Owner, ended: datetime, prices: PriceTable
) -> UsageEvent | None:
    """One output or error line as its usage row, priced at the batch rate."""
    if "custom_id" not in line:
        return None
    response = line.get("response")
    response = response if isinstance(response, dict) else {}
    body = response.get("body")
    body = body if isinstance(body, dict) else {}
    status = response.get("status_code")
    reported = body.get("usage")
    usage = usage_of(reported) if isinstance(reported, dict) else Usage()
    model = body.get("model")
    model = model if isinstance(model, str) and model and is_model_name(model) else None
    priced = prices.price_usage(model, "batch", usage)
    return UsageEvent(
        request_id=line_key(batch_id, line.get("custom_id")),
        created_at=ended,
        api_key_id=owner.api_key_id,
        feature=owner.feature,
        user_id=owner.user_id,
        endpoint=ENDPOINT,
        model=model,
        upstream_model=model,
        stream=False,
        # 0: the line has no response at all (a request the batch never ran, e.g. when it expired).
        status_code=status if type(status) is int and 0 <= status < 1000 else 0,
        attempts=1,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        cached_tokens=usage.cached_tokens,
        reasoning_tokens=usage.reasoning_tokens,
        usage_source="upstream",
        cost_units=priced.cost_units,
        latency_ms=0,
        ttfb_ms=None,
        error_type=_error_type(body, line.get("error")),
        service_tier="batch",
        price_key=priced.price_key,
        price_version=priced.price_version,
        audio_prompt_tokens=usage.audio_prompt_tokens,
        audio_completion_tokens=usage.audio_completion_tokens,
        image_prompt_tokens=usage.image_prompt_tokens,
        image_completion_tokens=usage.image_completion_tokens,
    )


def _error_type(body: dict[str, Any], line_error: object) -> str | None:
    for error in (body.get("error"), line_error):
        if isinstance(error, dict):
            value = error.get("code") or error.get("type")
            if isinstance(value, str) and value.isprintable():
                return value[:MAX_MODEL_CHARS]
    return None


def observe(
    meter: BatchMeter | None,
    method: str,
    path: str,
    status: int,
    body: bytes,
    call: CallRecord,
    intent: Intent | None = None,
) -> None:
    """From the passthrough, after a JSON answer: a batch created, or one retrieved. `intent`, the one
    written before a create went upstream, is handed on, or dropped when the upstream refused it."""
    if meter is None or status >= 300 or not path.startswith("batches"):
        if intent is not None:
            intent.release(drop=status >= 300)
        return
    creates = method == "POST" and path == "batches"
    retrieves = method == "GET" and path.count("/") == 1
    try:
        batch: Any = orjson.loads(body) if creates or retrieves else None
    except orjson.JSONDecodeError:
        batch = None
    if not isinstance(batch, dict) or batch.get("object") != "batch":
        if intent is not None:
            # An answer the gateway cannot read: what it created, if anything, is found from the intent.
            intent.release(drop=False)
        return
    if creates:
        meter.track(batch, call, intent)
    else:
        meter.found(batch)
