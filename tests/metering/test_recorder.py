"""The recorder against a real Postgres database made for this module (and dropped after it), and
against a SQLite file; outages are real ones: refused connections, killed backends, a held lock."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import event, func, select, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from app.call.record import CallRecord, Usage
from app.db.engine import async_url, create_engine
from app.db.events import Batch, UsageEvent, epoch_us, usd_to_cost
from app.db.migrate import upgrade
from app.db.models import metadata, usage_daily, usage_events
from app.db.partitions import alembic_include_object
from app.db.usage_writer import TABLE_COLUMNS, UsageWriter
from app.metering.pricing import Priced
from app.metering.recorder import Recorder
from app.metering.spool import REJECTED_FILE, Spool
from app.metering.usage import event_line

ADMIN_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


def as_row(event: UsageEvent) -> dict[str, Any]:
    """The usage_events row an event becomes."""
    return dict(zip(TABLE_COLUMNS, event, strict=True), cost_usd=event.cost_usd)


# A write is taken for an outage after spool_after_s: longer here than the tiny flush interval gives,
# so a first connection to the database is not one.
FAST = {
    "flush_interval_s": 0.02,
    "write_timeout_s": 2.0,
    "retry_initial_s": 0.05,
    "retry_max_s": 0.2,
    "spool_after_s": 1.0,
}


def make_event(**overrides: Any) -> UsageEvent:
    values: dict[str, Any] = {
        "request_id": uuid.uuid4().hex,
        "created_at": datetime.now(UTC),
        "api_key_id": "key_1",
        "feature": "chat",
        "user_id": "user_1",
        "endpoint": "/v1/chat/completions",
        "model": "gpt-4o-mini",
        "upstream_model": "gpt-4o-mini-2024-07-18",
        "stream": False,
        "status_code": 200,
        "attempts": 1,
        "prompt_tokens": 120,
        "completion_tokens": 30,
        "total_tokens": 150,
        "cached_tokens": 64,
        "reasoning_tokens": 0,
        "usage_source": "upstream",
        "cost_units": 432_100,
        "latency_ms": 812,
        "ttfb_ms": 240,
        "error_type": None,
    }
    if "cost_usd" in overrides:
        overrides["cost_units"] = usd_to_cost(overrides.pop("cost_usd"))
    values.update(overrides)
    return UsageEvent(**values)


def varied_events(n: int) -> list[UsageEvent]:
    """Spread over four UTC days and over keys with and without feature, user and model."""
    base = datetime(2026, 3, 1, 23, 30, tzinfo=UTC)
    return [
        make_event(
            created_at=base + timedelta(hours=7 * (i % 9)),
            feature=(None, "chat", "search")[i % 3],
            user_id=(None, "u1", "u2", "u3")[i % 4],
            model=(None, "gpt-4o", "gpt-4o-mini")[(i // 3) % 3],
            prompt_tokens=i,
            completion_tokens=2 * i,
            total_tokens=3 * i,
            cost_usd=None if i % 5 == 0 else Decimal(i) / Decimal(10**9),
        )
        for i in range(n)
    ]


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.02)


def _admin_engine() -> AsyncEngine:
    return create_async_engine(async_url(ADMIN_URL, Path()), isolation_level="AUTOCOMMIT", poolclass=NullPool)


async def _admin(*statements: str) -> None:
    admin = _admin_engine()
    try:
        async with admin.connect() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await admin.dispose()


@pytest.fixture(scope="module")
async def pg_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    name = f"metering_test_{uuid.uuid4().hex[:12]}"
    await _admin(f'CREATE DATABASE "{name}"')
    url = make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        await asyncio.to_thread(upgrade, url, tmp_path_factory.mktemp("unused"))
        yield url
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def engine(pg_url: str, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    eng = create_engine(pg_url, tmp_path)
    async with eng.begin() as conn:
        await conn.execute(text("TRUNCATE usage_events, usage_daily"))
    yield eng
    await eng.dispose()


@pytest.fixture
async def make_recorder(tmp_path: Path) -> AsyncIterator[Callable[..., Recorder]]:
    made: list[Recorder] = []

    def make(engine: AsyncEngine, spool_dir: Path = tmp_path / "spool", **kwargs: Any) -> Recorder:
        recorder = Recorder(engine, spool_dir, **{**FAST, **kwargs})
        made.append(recorder)
        return recorder

    yield make
    for recorder in made:
        await recorder.close(5)


class Outage:
    """Postgres refusing new connections to the database, its existing ones killed."""

    def __init__(self, database: str) -> None:
        self.database = database

    async def begin(self) -> None:
        await _admin(
            f'ALTER DATABASE "{self.database}" ALLOW_CONNECTIONS false',
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{self.database}'",
        )

    async def end(self) -> None:
        await _admin(f'ALTER DATABASE "{self.database}" ALLOW_CONNECTIONS true')


@pytest.fixture
async def outage(pg_url: str) -> AsyncIterator[Outage]:
    down = Outage(str(make_url(pg_url).database))
    yield down
    await down.end()


async def stored(engine: AsyncEngine) -> dict[str, dict[str, Any]]:
    async with engine.connect() as conn:
        rows = (await conn.execute(select(usage_events))).mappings().all()
    return {row["request_id"]: {c: row[c] for c in TABLE_COLUMNS} for row in rows}


async def count_rows(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(usage_events))).scalar_one())


async def assert_rollup_matches_events(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        expected = (
            await conn.execute(
                text(
                    "SELECT (created_at AT TIME ZONE 'UTC')::date, coalesce(feature, ''),"
                    " coalesce(user_id, ''), coalesce(model, ''), count(*), sum(prompt_tokens),"
                    " sum(completion_tokens), sum(total_tokens), coalesce(sum(cost_usd), 0)"
                    " FROM usage_events GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4"
                )
            )
        ).all()
        rollup = (await conn.execute(select(usage_daily).order_by(*usage_daily.primary_key.columns))).all()
    assert [tuple(r) for r in rollup] == [tuple(r) for r in expected]


def spool_files(spool_dir: Path) -> list[Path]:
    return sorted([*spool_dir.glob("usage-*.ndjson"), *spool_dir.glob("usage-*.jsonl")])


async def test_events_land_once_with_all_columns(
    engine: AsyncEngine, make_recorder: Callable[..., Recorder]
) -> None:
    events = [
        make_event(),
        make_event(
            api_key_id=None,
            feature=None,
            user_id=None,
            model=None,
            upstream_model=None,
            stream=True,
            status_code=502,
            attempts=3,
            cost_usd=None,
            ttfb_ms=None,
            error_type="upstream_error",
            usage_source="estimated",
        ),
        make_event(cached_tokens=0, reasoning_tokens=17, cost_usd=Decimal("12.3456789012")),
        # Lines go to Postgres as one parameter split at its newlines: quotes, backslashes, tabs, commas,
        # newlines and non-ASCII text in client-supplied fields must come out unchanged.
        make_event(user_id='a "quoted", back\\slash', feature="tab\there", model="ünïcødé 模型 \U0001f600"),
        make_event(user_id="new\nline\r\n", feature="\\N", error_type="\\.", client_request_id="x,y"),
        make_event(feature="", user_id=None, cost_usd=None, ttfb_ms=None),
    ]
    recorder = make_recorder(engine)
    await recorder.start()
    for e in events:
        recorder.submit(e.to_line())

    async def written() -> bool:
        return recorder.events_written == len(events)

    await eventually(written)
    assert await stored(engine) == {e.request_id: as_row(e) for e in events}
    assert recorder.write_errors == 0
    assert recorder.spool_events() == 0
    await assert_rollup_matches_events(engine)


async def test_a_burst_is_written_in_batches_of_at_most_batch_size(
    engine: AsyncEngine, make_recorder: Callable[..., Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events queued faster than they are written wait as full batches: a write never grows with the
    backlog (a bigger one would take longer than the write timeout allows)."""
    sizes: list[int] = []
    real_write = UsageWriter.write

    async def observed_write(self: UsageWriter, batch: Batch) -> int:
        sizes.append(batch.size)
        return await real_write(self, batch)

    monkeypatch.setattr(UsageWriter, "write", observed_write)
    recorder = make_recorder(engine, batch_size=10)
    await recorder.start()
    events = varied_events(95)
    for e in events:  # no await in between: the writer sees the whole burst at once
        recorder.submit(e.to_line())
    assert recorder.queue_depth() == 95

    async def written() -> bool:
        return recorder.events_written == len(events)

    await eventually(written)
    assert sorted(sizes) == [5, *[10] * 9]
    assert await stored(engine) == {e.request_id: as_row(e) for e in events}
    await assert_rollup_matches_events(engine)


async def test_resubmitted_request_ids_are_not_counted_twice(
    engine: AsyncEngine, make_recorder: Callable[..., Recorder]
) -> None:
    events = varied_events(40)
    recorder = make_recorder(engine)
    await recorder.start()
    for e in events:
        recorder.submit(e.to_line())

    async def first_written() -> bool:
        return recorder.events_written == 40

    await eventually(first_written)
    # Replays of every event, some twice in one batch and with other totals, then one new event:
    # once it is written, everything queued before it has been processed.
    for e in [*events, *events[:5], events[0]._replace(prompt_tokens=10**6)]:
        recorder.submit(e.to_line())
    last = make_event()
    recorder.submit(last.to_line())

    async def last_written() -> bool:
        return recorder.events_written == 41

    await eventually(last_written)
    assert await count_rows(engine) == 41
    async with engine.connect() as conn:
        assert (await conn.execute(select(func.sum(usage_daily.c.requests)))).scalar_one() == 41
    await assert_rollup_matches_events(engine)


async def test_usage_daily_equals_the_sums_of_usage_events(
    engine: AsyncEngine, make_recorder: Callable[..., Recorder]
) -> None:
    recorder = make_recorder(engine, batch_size=7)
    await recorder.start()
    # The smallest costs numeric(20,10) holds, added exactly.
    day = datetime(2026, 3, 2, 12, tzinfo=UTC)
    fine = [make_event(created_at=day, cost_units=d) for d in range(10)]
    events = varied_events(300) + fine
    for e in events:
        recorder.submit(e.to_line())

    async def written() -> bool:
        return recorder.events_written == len(events)

    await eventually(written)
    await assert_rollup_matches_events(engine)
    async with engine.connect() as conn:
        days = (await conn.execute(select(func.count(func.distinct(usage_daily.c.day))))).scalar_one()
    assert days == 4


async def test_the_recorder_keeps_its_connection_from_one_write_to_the_next(
    engine: AsyncEngine, make_recorder: Callable[..., Recorder]
) -> None:
    """A checkout costs a write the pool's ping, three more round trips: one checkout for five batches,
    and the connection back in the pool once the recorder is closed."""
    checkouts: list[object] = []
    event.listen(engine.sync_engine, "checkout", lambda *args: checkouts.append(args))
    recorder = make_recorder(engine, batch_size=10)
    await recorder.start()
    events = varied_events(50)
    for first in range(0, len(events), 10):
        for e in events[first : first + 10]:
            recorder.submit(e.to_line())

        async def batch_written(written: int = first + 10) -> bool:
            return recorder.events_written == written

        await eventually(batch_written)
    assert len(checkouts) == 1
    assert engine.sync_engine.pool.checkedout() == 1  # type: ignore[attr-defined]
    await recorder.close(5)
    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert await stored(engine) == {e.request_id: as_row(e) for e in events}


async def test_a_kept_connection_the_server_closed_loses_no_write(engine: AsyncEngine, pg_url: str) -> None:
    """Closed by the server while kept (a restart, an idle timeout): the write is made again on a
    connection from the pool, and lands once."""
    writer = UsageWriter(engine, keep=1)
    first, second = make_event(), make_event()
    assert await writer.write(Batch.of([first])) == 1
    await _admin(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        f" WHERE datname = '{make_url(pg_url).database}' AND pid <> pg_backend_pid()"
    )
    assert await writer.write(Batch.of([first, second])) == 1
    assert await stored(engine) == {e.request_id: as_row(e) for e in (first, second)}
    await assert_rollup_matches_events(engine)
    await writer.close()
    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_outage_spools_then_replays_every_event_exactly_once(
    engine: AsyncEngine, make_recorder: Callable[..., Recorder], outage: Outage, tmp_path: Path
) -> None:
    recorder = make_recorder(engine, batch_size=50)
    await recorder.start()
    before = make_event()
    recorder.submit(before.to_line())

    async def before_written() -> bool:
        return recorder.events_written == 1

    await eventually(before_written)

    await outage.begin()
    events = varied_events(500)
    for e in events:
        recorder.submit(e.to_line())

    async def all_spooled() -> bool:
        return recorder.events_spooled == len(events) and recorder.queue_depth() == 0

    await eventually(all_spooled)
    assert recorder.write_errors >= 1
    assert recorder.spool_events() == len(events)
    assert recorder.spool_bytes() > 0

    await outage.end()

    async def replayed() -> bool:
        return recorder.spool_events() == 0 and recorder.events_written == 1 + len(events)

    await eventually(replayed)
    rows = await stored(engine)
    assert set(rows) == {before.request_id} | {e.request_id for e in events}
    assert rows == {e.request_id: as_row(e) for e in [before, *events]}
    await assert_rollup_matches_events(engine)
    assert spool_files(tmp_path / "spool") == []

    # The writer is back on the database, not still spooling.
    after = make_event()
    recorder.submit(after.to_line())

    async def after_written() -> bool:
        return recorder.events_written == 2 + len(events)

    await eventually(after_written)
    assert recorder.events_spooled == len(events)


async def test_hung_database_times_out_into_the_spool(
    engine: AsyncEngine, make_recorder: Callable[..., Recorder], pg_url: str, tmp_path: Path
) -> None:
    recorder = make_recorder(engine, write_timeout_s=0.3)
    await recorder.start()
    events = varied_events(20)
    blocker = create_engine(pg_url, tmp_path)
    try:
        async with blocker.connect() as conn:
            await conn.execute(text("LOCK TABLE usage_events IN ACCESS EXCLUSIVE MODE"))
            for e in events:
                recorder.submit(e.to_line())

            async def spooled() -> bool:
                return recorder.events_spooled == len(events)

            await eventually(spooled)
            assert recorder.events_written == 0
            await conn.rollback()  # releases the lock

        async def replayed() -> bool:
            return recorder.events_written == len(events) and recorder.spool_events() == 0

        await eventually(replayed)
    finally:
        await blocker.dispose()
    assert await count_rows(engine) == len(events)
    await assert_rollup_matches_events(engine)


async def test_a_stuck_database_has_every_batch_in_the_spool_long_before_the_write_timeout(
    engine: AsyncEngine,
    make_recorder: Callable[..., Recorder],
    pg_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Writes that hang: each batch is copied to the spool half a flush interval after it is taken, the
    first two while their writes wait, the third while it waits for one of their two slots; none of it
    is taken for an outage before the write timeout. Once the database answers, the writes commit and
    the copies are deleted unread: each event lands once, none is read back."""
    recorder = make_recorder(engine, flush_interval_s=0.2, spool_after_s=None, write_timeout_s=60)
    await recorder.start()
    waves = [varied_events(20), varied_events(5), varied_events(7)]
    blocker = create_engine(pg_url, tmp_path)
    try:
        async with blocker.connect() as conn:
            await conn.execute(text("LOCK TABLE usage_events IN ACCESS EXCLUSIVE MODE"))
            for wave in waves:
                spooled_before = recorder.events_spooled
                for e in wave:
                    recorder.submit(e.to_line())

                async def spooled(wave: list[UsageEvent] = wave, before: int = spooled_before) -> bool:
                    return recorder.events_spooled == before + len(wave)

                await eventually(spooled, timeout_s=10)
            assert recorder.events_written == 0
            assert recorder.spool_events() == sum(map(len, waves))
            await conn.rollback()  # releases the lock: the stuck writes commit, the third gets a slot

        async def written() -> bool:
            return recorder.spool_events() == 0 and await count_rows(engine) == sum(map(len, waves))

        await eventually(written)
    finally:
        await blocker.dispose()
    assert recorder.events_replayed == 0 and recorder.write_errors == 0
    assert spool_files(tmp_path / "spool") == []
    assert "usage write failed" not in caplog.text
    await assert_rollup_matches_events(engine)


async def test_a_slow_write_is_copied_to_the_spool_and_is_no_outage(
    engine: AsyncEngine,
    make_recorder: Callable[..., Recorder],
    pg_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A write that commits after the hedge: its batch has a copy in the spool meanwhile, deleted unread
    once the write commits (never replayed: the database is not asked for the batch twice); each event
    lands once, and nothing is said about an outage; the next batch goes to the database."""
    recorder = make_recorder(engine)
    await recorder.start()
    first, later = varied_events(20), varied_events(5)
    blocker = create_engine(pg_url, tmp_path)
    try:
        async with blocker.connect() as conn:
            await conn.execute(text("LOCK TABLE usage_events IN ACCESS EXCLUSIVE MODE"))
            for e in first:
                recorder.submit(e.to_line())

            async def copied() -> bool:
                return recorder.events_spooled == len(first)

            await eventually(copied)
            (copy,) = spool_files(tmp_path / "spool")
            assert recorder.spool_events() == len(first)
            # Held back from the replay while the write may commit: no other process can claim it.
            assert Spool(tmp_path / "spool").claim(copy) is None
            await conn.rollback()  # releases the lock: the slow write commits
    finally:
        await blocker.dispose()

    async def written(count: int) -> bool:
        return recorder.spool_events() == 0 and await count_rows(engine) == count

    await eventually(lambda: written(len(first)))
    for e in later:
        recorder.submit(e.to_line())
    await eventually(lambda: written(len(first) + len(later)))
    assert recorder.events_spooled == len(first)
    assert recorder.events_replayed == 0
    assert spool_files(tmp_path / "spool") == []
    assert recorder.write_errors == 0
    assert "usage write failed" not in caplog.text
    await assert_rollup_matches_events(engine)


def test_a_held_copy_is_deleted_unread_or_left_to_the_replay(tmp_path: Path) -> None:
    spool, replayer = Spool(tmp_path), Spool(tmp_path)
    events = varied_events(3)
    dropped = spool.hold(Batch.of(events))
    (path,) = spool_files(tmp_path)
    assert replayer.sealed_files() == [path] and replayer.claim(path) is None  # locked
    assert spool.events() == 3
    dropped.drop()
    assert spool_files(tmp_path) == [] and spool.events() == 0

    kept = spool.hold(Batch.of(events))
    kept.release()  # the write failed, or (the kernel's doing) the process died
    (path,) = spool_files(tmp_path)
    claimed = replayer.claim(path)
    assert claimed is not None
    with claimed:
        batch, _, malformed = claimed.read_batch(0, 10)
    assert [e.request_id for e in batch.events()] == [e.request_id for e in events] and malformed == 0


async def test_spool_left_by_a_previous_process_is_replayed_on_start(
    engine: AsyncEngine, make_recorder: Callable[..., Recorder], tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    events = varied_events(30)
    # What a crash mid-append leaves: complete lines and a torn last one.
    lines = b"".join(e.to_json() + b"\n" for e in events) + events[0].to_json()[:25]
    (spool_dir / "usage-00000000000000000001-4242-deadbeef.jsonl").write_bytes(lines)
    # A live sibling worker's active file is its own to replay: it must be left alone.
    sibling = Spool(spool_dir)
    sibling_event = make_event()
    sibling.append(Batch.of([sibling_event]))
    # Lines go to files an older gateway does not read (it would skip lines it cannot parse).
    assert [p.suffix for p in spool_files(spool_dir)] == [".jsonl", ".ndjson"]

    recorder = make_recorder(engine, spool_dir, batch_size=8)
    await recorder.start()

    async def replayed() -> bool:
        return recorder.events_written == len(events)

    await eventually(replayed)
    rows = await stored(engine)
    assert rows == {e.request_id: as_row(e) for e in events}
    await assert_rollup_matches_events(engine)

    async def file_removed() -> bool:
        return len(spool_files(spool_dir)) == 1

    await eventually(file_removed)
    assert sibling_event.request_id not in rows
    await recorder.close(5)

    sibling.seal()  # the sibling exits: its file is anybody's to replay now
    successor = make_recorder(engine, spool_dir)
    await successor.start()

    async def sibling_replayed() -> bool:
        return successor.events_written == 1 and spool_files(spool_dir) == []

    await eventually(sibling_replayed)
    assert sibling_event.request_id in await stored(engine)


async def test_close_drains_the_queue_into_the_database(
    engine: AsyncEngine, make_recorder: Callable[..., Recorder], tmp_path: Path
) -> None:
    recorder = make_recorder(engine, batch_size=100, flush_interval_s=30)
    await recorder.start()
    events = varied_events(1000)
    for e in events:
        recorder.submit(e.to_line())
    await recorder.close(10)
    assert await count_rows(engine) == len(events)
    assert recorder.spool_events() == 0
    assert spool_files(tmp_path / "spool") == []
    await assert_rollup_matches_events(engine)


async def test_close_spools_what_an_unreachable_database_cannot_take(
    engine: AsyncEngine, make_recorder: Callable[..., Recorder], outage: Outage, tmp_path: Path
) -> None:
    recorder = make_recorder(engine)
    await recorder.start()
    await outage.begin()
    events = varied_events(100)
    for e in events:
        recorder.submit(e.to_line())
    await recorder.close(10)
    assert recorder.events_written == 0
    assert recorder.spool_events() == len(events)
    assert recorder.spool_bytes() > 0

    await outage.end()
    successor = make_recorder(engine)
    await successor.start()

    async def replayed() -> bool:
        return successor.events_written == len(events)

    await eventually(replayed)
    assert await count_rows(engine) == len(events)
    await assert_rollup_matches_events(engine)


async def test_close_gives_up_on_a_hung_database_after_its_timeout(
    engine: AsyncEngine, make_recorder: Callable[..., Recorder], pg_url: str, tmp_path: Path
) -> None:
    recorder = make_recorder(engine, write_timeout_s=60)
    await recorder.start()
    events = varied_events(50)
    blocker = create_engine(pg_url, tmp_path)
    try:
        async with blocker.connect() as conn:
            await conn.execute(text("LOCK TABLE usage_events IN ACCESS EXCLUSIVE MODE"))
            for e in events:
                recorder.submit(e.to_line())
            started = time.monotonic()
            await recorder.close(0.5)
            # The cancelled write's connection is closed gracefully first, for up to 2 s.
            assert time.monotonic() - started < 5
            assert recorder.spool_events() == len(events)
            await conn.rollback()
    finally:
        await blocker.dispose()

    successor = make_recorder(engine)
    await successor.start()

    async def replayed() -> bool:
        return successor.events_written == len(events)

    await eventually(replayed)
    assert set(await stored(engine)) == {e.request_id for e in events}
    await assert_rollup_matches_events(engine)


async def test_a_full_queue_overflows_into_the_spool(
    engine: AsyncEngine, make_recorder: Callable[..., Recorder]
) -> None:
    recorder = make_recorder(engine, max_queue=5)
    events = varied_events(20)
    for e in events:
        recorder.submit(e.to_line())
    assert recorder.queue_depth() == 5
    assert recorder.spool_events() == 15
    await recorder.start()

    async def all_written() -> bool:
        return recorder.events_written == 20 and recorder.spool_events() == 0

    await eventually(all_written)
    assert set(await stored(engine)) == {e.request_id for e in events}
    await assert_rollup_matches_events(engine)


async def test_submit_never_raises_even_when_the_spool_cannot_be_written(
    engine: AsyncEngine, make_recorder: Callable[..., Recorder], tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    recorder = make_recorder(engine, spool_dir, max_queue=0)
    spool_dir.rmdir()
    spool_dir.write_bytes(b"")  # a file where the directory was: every spool write fails
    recorder.submit(make_event().to_line())
    recorder.submit(make_event().to_line())
    assert recorder.events_lost == 2
    assert recorder.events_spooled == 0


async def test_an_event_the_database_refuses_is_set_aside(
    engine: AsyncEngine, make_recorder: Callable[..., Recorder], tmp_path: Path
) -> None:
    # Each refused write costs its connection, and the halving takes several: about a second on a loaded
    # machine, where FAST's hedge would copy the batch to the spool.
    recorder = make_recorder(engine, spool_after_s=10.0)
    await recorder.start()
    good = varied_events(9)
    refused = [
        make_event(feature="chat\x00"),  # Postgres text cannot hold NUL
        make_event(cost_units=2**63),  # beyond bigint
        make_event(attempts=40_000),  # smallint
    ]
    for e in [*good[:4], refused[0], *good[4:], *refused[1:]]:
        recorder.submit(e.to_line())

    async def settled() -> bool:
        return recorder.events_written == 9 and recorder.events_rejected == 3

    await eventually(settled)
    assert set(await stored(engine)) == {e.request_id for e in good}
    assert recorder.write_errors == 0
    assert recorder.events_spooled == 0
    rejected = (tmp_path / "spool" / REJECTED_FILE).read_bytes().splitlines()
    assert {UsageEvent.from_json(line).request_id for line in rejected} == {e.request_id for e in refused}
    await assert_rollup_matches_events(engine)


def _schema_diff(conn: Connection) -> list[Any]:
    context = MigrationContext.configure(conn, opts={"include_object": alembic_include_object})
    return list(compare_metadata(context, metadata))


async def test_migrations_create_what_the_models_describe(engine: AsyncEngine, tmp_path: Path) -> None:
    await asyncio.to_thread(upgrade, None, tmp_path)
    sqlite_engine = create_engine(None, tmp_path)
    try:
        for eng in (engine, sqlite_engine):
            async with eng.connect() as conn:
                assert await conn.run_sync(_schema_diff) == []
    finally:
        await sqlite_engine.dispose()


async def test_replicas_migrating_at_once_all_succeed(tmp_path: Path) -> None:
    name = f"metering_test_{uuid.uuid4().hex[:12]}"
    await _admin(f'CREATE DATABASE "{name}"')
    url = make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    # Processes, as replicas are: Alembic keeps its migration context in module globals.
    script = "import sys, pathlib, app.db.migrate as m; m.upgrade(sys.argv[1], pathlib.Path())"
    try:
        replicas = [
            await asyncio.create_subprocess_exec(sys.executable, "-c", script, url, cwd=tmp_path)
            for _ in range(3)
        ]
        assert [await p.wait() for p in replicas] == [0, 0, 0]
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_sqlite_migrations_and_writes(tmp_path: Path, make_recorder: Callable[..., Recorder]) -> None:
    data_dir = tmp_path / "data"
    await asyncio.to_thread(upgrade, None, data_dir)
    assert (data_dir / "gateway.db").is_file()
    sqlite_engine = create_engine(None, data_dir)
    try:
        recorder = make_recorder(sqlite_engine)
        await recorder.start()
        events = varied_events(50)
        for e in [*events, *events[:10]]:
            recorder.submit(e.to_line())
        last = make_event()
        recorder.submit(last.to_line())

        async def written() -> bool:
            return recorder.events_written == 51

        await eventually(written)
        await recorder.close(5)
        rows = await stored(sqlite_engine)
        assert rows == {e.request_id: as_row(e) for e in [*events, last]}

        expected: dict[tuple[Any, ...], list[Any]] = {}
        for e in [*events, last]:
            key = (e.created_at.date(), e.feature or "", e.user_id or "", e.model or "")
            acc = expected.setdefault(key, [0, 0, 0, 0, Decimal(0)])
            for i, value in enumerate((1, e.prompt_tokens, e.completion_tokens, e.total_tokens)):
                acc[i] += value
            acc[4] += e.cost_usd or 0
        async with sqlite_engine.connect() as conn:
            rollup = (await conn.execute(select(usage_daily))).all()
        assert {tuple(r[:4]): list(r[4:]) for r in rollup} == expected
    finally:
        await sqlite_engine.dispose()


def test_events_round_trip_through_json() -> None:
    event = make_event(cost_usd=Decimal("0.1000000001"), feature=None, ttfb_ms=None)
    line = event.to_json()
    assert b"\n" not in line
    assert UsageEvent.from_json(line) == event
    for bad in (b"", b"[1]", b'{"request_id": "x"}', line[:-3], line.replace(b'"0.1000000001"', b'"x"')):
        with pytest.raises(ValueError):
            UsageEvent.from_json(bad)
    naive = line.replace(event.created_at.isoformat().encode(), b"2026-01-01T00:00:00")
    assert naive != line
    with pytest.raises(ValueError):
        UsageEvent.from_json(naive)


def test_events_round_trip_through_lines_and_older_spool_lines_still_read() -> None:
    event = make_event(cost_usd=Decimal("0.1000000001"), user_id='quote " back\\slash \t tab', ttfb_ms=None)
    line = event.to_line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert UsageEvent.from_line(line) == event
    # A spool written before lines: one JSON object per event, the cost in dollars.
    assert UsageEvent.from_line(event.to_json() + b"\n") == event
    # A newer version's line, with a field this one does not know yet.
    assert UsageEvent.from_line(line.rstrip()[:-1] + b',"later"]\n') == event
    batch = Batch.of([event, make_event(), make_event()])
    assert batch.size == 3 and batch.events()[0] == event
    first, second = batch.halves()
    assert (first.size, second.size) == (1, 2)
    assert first.events() + second.events() == batch.events()
    time_as_text = line.replace(str(epoch_us(event.created_at)).encode(), b'"2026-01-01T00:00:00Z"')
    assert time_as_text != line
    for bad in (b"", b"[1]", b"{}", line[:-5], time_as_text):
        with pytest.raises(ValueError):
            UsageEvent.from_line(bad)


def test_the_request_paths_line_holds_each_field_where_usage_event_has_it() -> None:
    call = CallRecord(request_id="req_1", method="POST", path="/v1/chat/completions")
    call.created_at = datetime(2026, 5, 4, 3, 2, 1, 123456, tzinfo=UTC).timestamp()
    admitted, outcome = call.admitted, call.outcome
    call.client_request_id = "mine"
    admitted.api_key_id, admitted.feature, admitted.user_id = "key_9", "f", "u"
    admitted.endpoint, admitted.model, admitted.stream = "/v1/chat/completions", "m", True
    outcome.upstream_model = "um"
    outcome.status_code, outcome.attempts, outcome.ttfb_s, outcome.error_type = 206, 3, 0.0421, "e"
    admitted.prompt_truncated = True
    usage = Usage(33, 22, 55, 4, 5, 6, 7, 8, 9)
    priced = Priced(777, "m@flex", "2026-11-05")
    event = UsageEvent.from_line(event_line(call, usage, "estimated", priced, "flex", 1.5))
    assert event == UsageEvent(
        request_id="req_1",
        created_at=datetime(2026, 5, 4, 3, 2, 1, 123456, tzinfo=UTC),
        api_key_id="key_9",
        feature="f",
        user_id="u",
        endpoint="/v1/chat/completions",
        model="m",
        upstream_model="um",
        stream=True,
        status_code=206,
        attempts=3,
        prompt_tokens=33,
        completion_tokens=22,
        total_tokens=55,
        cached_tokens=4,
        reasoning_tokens=5,
        usage_source="estimated",
        cost_units=777,
        latency_ms=1500,
        ttfb_ms=42,
        error_type="e",
        prompt_truncated=True,
        client_request_id="mine",
        service_tier="flex",
        price_key="m@flex",
        price_version="2026-11-05",
        audio_prompt_tokens=6,
        audio_completion_tokens=7,
        image_prompt_tokens=8,
        image_completion_tokens=9,
    )


@pytest.fixture(autouse=True)
def _no_event_contents_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    yield
    for record in caplog.records:
        assert "user_1" not in record.getMessage()
        assert "\x00" not in record.getMessage()
