"""usage_events partitioned by month: the migration of a table that has rows, partitions made ahead,
retention by whole partitions (by hand and by the gateway), and exactly-once writes across the change."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.engine import create_engine
from app.db.events import Batch
from app.db.migrate import alembic_config
from app.db.partitions import before_partition_name, ensure_partitions, next_month, partition_name, prune
from app.db.usage_writer import write_batch
from tests.db import ADMIN_URL, admin, plain_url
from tests.harness import ThreadedGateway, wait_until
from tests.metering.test_recorder import make_event

ROOT = Path(__file__).resolve().parents[2]
# Rows every 71 minutes from the first instant of October to late February: five months across a
# year's end.
MONTHS = [date(2025, 10, 1), date(2025, 11, 1), date(2025, 12, 1), date(2026, 1, 1), date(2026, 2, 1)]
ROWS = 3000
# A checksum of every row, every column as it prints: the same before and after, or a row was changed.
CHECKSUM = "SELECT count(*) AS n, md5(string_agg(t::text, ',' ORDER BY id)) AS sum FROM usage_events t"
KIND = "SELECT relkind::text AS kind FROM pg_class WHERE relname = 'usage_events'"
DEFAULT = "usage_events_default"
BY_MONTH = "SELECT md5(string_agg(v::text, ',' ORDER BY month)) AS sum FROM events_by_month v"
READER = f"reader_{os.urandom(4).hex()}"
GRANTED = (
    f"SELECT has_table_privilege('{READER}', 'usage_events', 'SELECT') AS events,"
    f" has_table_privilege('{READER}', 'busiest_month', 'SELECT') AS view,"
    f" has_table_privilege('{READER}', 'usage_events', 'INSERT') AS other"
)
DAILY = "SELECT count(*) AS n, sum(requests) AS requests, sum(cost_usd) AS cost FROM usage_daily"


def _url(name: str) -> str:
    return make_url(plain_url(ADMIN_URL)).set(database=name).render_as_string(hide_password=False)


@pytest.fixture
async def bare_db(tmp_path: Path) -> AsyncIterator[str]:
    """An empty database, not migrated."""
    name = f"partition_test_{os.urandom(5).hex()}"
    await asyncio.to_thread(admin, f'CREATE DATABASE "{name}"')
    try:
        yield _url(name)
    finally:
        await asyncio.to_thread(
            admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f"DROP ROLE IF EXISTS {READER}"
        )


async def _one(engine: AsyncEngine, sql: str) -> dict[str, Any]:
    async with engine.connect() as conn:
        return dict((await conn.execute(text(sql))).mappings().one())


async def _partitions(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = 'usage_events'::regclass ORDER BY 1"
            )
        )
        return list(rows.scalars())


def _before_partitioning() -> str:
    script = ScriptDirectory.from_config(alembic_config(None, Path()))
    down = script.get_revision("0011").down_revision
    assert isinstance(down, str)
    return down


async def test_the_migration_partitions_a_table_with_rows_over_several_months_and_loses_none(
    bare_db: str, tmp_path: Path
) -> None:
    config = alembic_config(bare_db, tmp_path)
    await asyncio.to_thread(command.upgrade, config, _before_partitioning())
    engine = create_engine(bare_db, tmp_path)
    try:
        # Generated in SQL, as a table grown over months would be; the columns later migrations add
        # keep their defaults.
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO usage_events (created_at, request_id, feature, user_id, endpoint, model,"
                    " stream, status_code, attempts, prompt_tokens, completion_tokens, total_tokens,"
                    " usage_source, cost_usd, latency_ms)"
                    " SELECT timestamptz '2025-10-01 00:00:00+00' + (g * interval '71 minutes'),"
                    " 'req_old_' || g, 'f' || (g % 7), 'u' || (g % 13), '/v1/chat/completions', 'gpt-4o',"
                    " g % 2 = 0, 200, 1, g, 2 * g, 3 * g, 'upstream', g / 1e6, 100 + g % 50"
                    f" FROM generate_series(0, {ROWS - 1}) g"
                )
            )
        # Views on the table (a later migration's, or an operator's), one reading another, survive.
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "CREATE VIEW events_by_month AS SELECT date_trunc('month', created_at) AS month,"
                    " count(*) AS n, sum(cost_usd) AS cost FROM usage_events GROUP BY 1"
                )
            )
            await conn.execute(text("CREATE VIEW busiest_month AS SELECT max(n) AS n FROM events_by_month"))
            # And what was granted on them, to a dashboards' role.
            await conn.execute(text(f"CREATE ROLE {READER}"))
            await conn.execute(text(f"GRANT SELECT ON usage_events, busiest_month TO {READER}"))
        before = await _one(engine, CHECKSUM)
        assert before["n"] == ROWS
        by_month = await _one(engine, BY_MONTH)

        await asyncio.to_thread(command.upgrade, config, "head")

        assert await _one(engine, CHECKSUM) == before
        assert await _one(engine, KIND) == {"kind": "p"}
        assert await _one(engine, BY_MONTH) == by_month
        assert (await _one(engine, "SELECT n FROM busiest_month"))["n"] > 0
        assert await _one(engine, GRANTED) == {"events": True, "view": True, "other": False}
        # The table was not copied: it became the partition of everything before the month after next,
        # and month partitions follow it.
        made = await _partitions(engine)
        bound = next_month(next_month(datetime.now(UTC).date().replace(day=1)))
        old = before_partition_name(bound)
        assert set(made) == {old, partition_name(bound), partition_name(next_month(bound)), DEFAULT}
        assert (await _one(engine, f"SELECT count(*) AS n FROM {old}"))["n"] == ROWS
        assert (await _one(engine, f"SELECT count(*) AS n FROM {DEFAULT}"))["n"] == 0
        # The indexes are on each partition, and the unique keys hold the partition key (the old ones,
        # on id and on request_id alone, are gone).
        found = []
        for name in (old, partition_name(bound)):
            async with engine.connect() as conn:
                indexes = (
                    await conn.execute(
                        text("SELECT indexdef FROM pg_indexes WHERE tablename = :t"), {"t": name}
                    )
                ).scalars()
                found.append(sorted(index.split(" USING btree ")[1] for index in indexes))
        assert found[0] == found[1]
        assert {
            "(id, created_at)",
            "(request_id, created_at)",
            "(created_at)",
            "(feature, created_at)",
        } <= set(found[0])
        assert "(id)" not in found[0] and "(request_id)" not in found[0]

        # New events continue the ids, and a replayed one (same request_id, same created_at) is no
        # second row and no second count in usage_daily.
        event = make_event(created_at=datetime(2025, 12, 24, 12, tzinfo=UTC))
        assert await write_batch(engine, Batch.of([event])) == 1
        assert await write_batch(engine, Batch.of([event, event])) == 0
        rows = await _one(
            engine,
            "SELECT count(*) AS n, min(id) AS id, min(tableoid::regclass::text) AS part FROM usage_events"
            f" WHERE request_id = '{event.request_id}'",
        )
        assert rows == {"n": 1, "id": ROWS + 1, "part": old}
        daily = await _one(engine, "SELECT sum(requests) AS n FROM usage_daily")
        assert daily["n"] == 1

        # And back: the same rows in a plain table.
        after = await _one(engine, CHECKSUM)
        await asyncio.to_thread(command.downgrade, config, _before_partitioning())
        assert await _one(engine, CHECKSUM) == after
        assert await _one(engine, KIND) == {"kind": "r"}
        assert (await _one(engine, "SELECT n FROM busiest_month"))["n"] > 0
        assert await _one(engine, GRANTED) == {"events": True, "view": True, "other": False}
    finally:
        await engine.dispose()


async def test_a_converted_tables_old_rows_are_dropped_whole_and_a_broken_off_conversion_resumes(
    bare_db: str, tmp_path: Path
) -> None:
    config = alembic_config(bare_db, tmp_path)
    await asyncio.to_thread(command.upgrade, config, _before_partitioning())
    engine = create_engine(bare_db, tmp_path)
    try:
        old_event = make_event(created_at=datetime(2025, 3, 9, tzinfo=UTC))
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO usage_events (created_at, request_id, endpoint, stream, status_code,"
                    " attempts, usage_source, latency_ms)"
                    " VALUES ('2025-03-09 00:00:00+00', :r, '/v1/chat/completions', false, 200, 1,"
                    " 'upstream', 10)"
                ),
                {"r": old_event.request_id},
            )
        # What a run stopped before its switch leaves: the CHECK with another bound, not yet validated,
        # one index built and one left invalid by a build that broke off.
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "ALTER TABLE usage_events ADD CONSTRAINT usage_events_before_bound"
                    " CHECK (created_at < '2099-01-01 00:00:00+00') NOT VALID"
                )
            )
            await conn.execute(
                text("CREATE UNIQUE INDEX usage_events_before_pkey ON usage_events (id, created_at)")
            )
            await conn.execute(
                text(
                    "CREATE UNIQUE INDEX usage_events_before_request_id_created_at_key"
                    " ON usage_events (request_id)"
                )
            )
            await conn.execute(
                text(
                    "UPDATE pg_index SET indisvalid = false"
                    " WHERE indexrelid = 'usage_events_before_request_id_created_at_key'::regclass"
                )
            )
        await asyncio.to_thread(command.upgrade, config, "head")
        bound = next_month(next_month(datetime.now(UTC).date().replace(day=1)))
        old = before_partition_name(bound)
        assert (await _one(engine, f"SELECT request_id FROM {old}"))["request_id"] == old_event.request_id
        assert (await _one(engine, "SELECT count(*) AS n FROM pg_index WHERE NOT indisvalid"))["n"] == 0
        # A replay of the old event is no second row: the rebuilt index is on (request_id, created_at).
        # A late event of its month joins it.
        late = make_event(created_at=datetime(2025, 3, 10, tzinfo=UTC))
        assert await write_batch(engine, Batch.of([old_event, late])) == 1
        assert (await _one(engine, f"SELECT count(*) AS n FROM {old}"))["n"] == 2
        # Months the old table's partition holds get none of their own.
        async with engine.begin() as conn:
            assert await conn.run_sync(ensure_partitions, date(2025, 3, 1)) == []
        # Retention takes it whole, once all of it is past the cut, and nothing before; usage_daily keeps
        # its sums.
        daily = await _one(engine, DAILY)
        async with engine.begin() as conn:
            assert await conn.run_sync(prune, bound - timedelta(days=1)) == []
        async with engine.begin() as conn:
            assert await conn.run_sync(prune, bound) == [old]
        assert old not in await _partitions(engine)
        assert await _one(engine, DAILY) == daily and daily["requests"] == 1
    finally:
        await engine.dispose()


async def test_partitions_are_made_ahead_and_take_over_what_the_default_one_held(
    bare_db: str, tmp_path: Path
) -> None:
    await asyncio.to_thread(command.upgrade, alembic_config(bare_db, tmp_path), "head")
    engine = create_engine(bare_db, tmp_path)
    try:
        # An event from a month nobody made a partition for yet is kept, in the default partition.
        far = make_event(created_at=datetime(2035, 5, 10, tzinfo=UTC))
        assert await write_batch(engine, Batch.of([far])) == 1
        async with engine.begin() as conn:
            made = await conn.run_sync(ensure_partitions, date(2035, 4, 20))
        assert made == [partition_name(date(2035, m, 1)) for m in (4, 5, 6, 7)]
        async with engine.begin() as conn:
            assert await conn.run_sync(ensure_partitions, date(2035, 4, 20)) == []
        assert (await _one(engine, "SELECT count(*) AS n FROM usage_events_default"))["n"] == 0
        moved = await _one(engine, "SELECT request_id FROM usage_events_p203505")
        assert moved["request_id"] == far.request_id
        # And it is still the one row of its request.
        assert await write_batch(engine, Batch.of([far])) == 0
    finally:
        await engine.dispose()


async def test_replicas_making_partitions_at_once_take_turns(bare_db: str, tmp_path: Path) -> None:
    await asyncio.to_thread(command.upgrade, alembic_config(bare_db, tmp_path), "head")
    engines = [create_engine(bare_db, tmp_path) for _ in range(3)]

    async def make(engine: AsyncEngine) -> list[str]:
        async with engine.begin() as conn:
            made: list[str] = await conn.run_sync(ensure_partitions, date(2041, 3, 1))
            return made

    try:
        made = await asyncio.gather(*(make(engine) for engine in engines))
    finally:
        for engine in engines:
            await engine.dispose()
    assert sorted(name for names in made for name in names) == [
        partition_name(date(2041, m, 1)) for m in (3, 4, 5, 6)
    ]


def _cli(*args: str, database_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


async def test_prune_drops_whole_months_and_usage_daily_keeps_their_sums(
    bare_db: str, tmp_path: Path
) -> None:
    await asyncio.to_thread(command.upgrade, alembic_config(bare_db, tmp_path), "head")
    engine = create_engine(bare_db, tmp_path)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(ensure_partitions, date(2024, 11, 1))
        events = [
            make_event(created_at=datetime(2024, 11, 30, 23, 59, tzinfo=UTC)),
            make_event(created_at=datetime(2024, 12, 15, tzinfo=UTC)),
            make_event(created_at=datetime(2025, 1, 1, tzinfo=UTC)),
            make_event(created_at=datetime(2025, 1, 20, tzinfo=UTC)),
        ]
        assert await write_batch(engine, Batch.of(events)) == 4
        daily = await _one(engine, DAILY)

        refused = _cli("usage", "prune", "--before", "next month", database_url=bare_db)
        assert refused.returncode == 2
        assert "is not YYYY-MM-DD" in refused.stderr
        refused = _cli("usage", "prune", "--before", "2999-01-01", database_url=bare_db)
        assert refused.returncode == 2
        assert "is in the future" in refused.stderr

        # Mid-January: December ends before it, January does not.
        done = _cli("usage", "prune", "--before", "2025-01-15", database_url=bare_db)
        assert done.returncode == 0, done.stderr
        assert "usage_events_p202411" in done.stdout and "usage_events_p202412" in done.stdout
        left = await _partitions(engine)
        assert "usage_events_p202411" not in left and "usage_events_p202412" not in left
        assert {"usage_events_p202501", "usage_events_p202502", "usage_events_default"} <= set(left)
        async with engine.connect() as conn:
            kept = set((await conn.execute(text("SELECT request_id FROM usage_events"))).scalars())
        assert kept == {events[2].request_id, events[3].request_id}
        assert await _one(engine, DAILY) == daily
    finally:
        await engine.dispose()


async def test_the_migration_on_sqlite_keeps_rows_and_views(tmp_path: Path) -> None:
    config = alembic_config(None, tmp_path)
    await asyncio.to_thread(command.upgrade, config, _before_partitioning())
    engine = create_engine(None, tmp_path)
    try:
        event = make_event(created_at=datetime(2025, 12, 24, tzinfo=UTC))
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO usage_events (created_at, request_id, endpoint, stream, status_code,"
                    " attempts, usage_source, latency_ms)"
                    " VALUES ('2025-12-24 00:00:00.000000', :r, '/v1/chat/completions', 0, 200, 1,"
                    " 'upstream', 10)"
                ),
                {"r": event.request_id},
            )
            await conn.execute(text("CREATE VIEW events_per_day AS SELECT count(*) AS n FROM usage_events"))
        await engine.dispose()  # migrated while no connection is open, as `make run` does
        await asyncio.to_thread(command.upgrade, config, "head")
        # The old row and the recorder's replay of the same event are one row.
        assert await write_batch(engine, Batch.of([event])) == 0
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT n FROM events_per_day"))).scalar() == 1
        await asyncio.to_thread(command.downgrade, config, _before_partitioning())
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT n FROM events_per_day"))).scalar() == 1
    finally:
        await engine.dispose()


async def test_prune_on_the_embedded_sqlite_database_deletes_the_rows(tmp_path: Path) -> None:
    await asyncio.to_thread(command.upgrade, alembic_config(None, tmp_path), "head")
    engine = create_engine(None, tmp_path)
    try:
        old, new = (
            make_event(created_at=datetime(2031, 11, 30, tzinfo=UTC)),
            make_event(created_at=datetime(2031, 12, 1, tzinfo=UTC)),
        )
        assert await write_batch(engine, Batch.of([old, new])) == 2
        assert await write_batch(engine, Batch.of([old])) == 0
        async with engine.begin() as conn:
            assert await conn.run_sync(prune, date(2031, 12, 31)) == ["1 row(s)"]
        async with engine.connect() as conn:
            kept = list((await conn.execute(text("SELECT request_id FROM usage_events"))).scalars())
            requests = (await conn.execute(text("SELECT sum(requests) FROM usage_daily"))).scalar()
        assert kept == [new.request_id]
        assert requests == 2
    finally:
        await engine.dispose()


def test_the_gateway_makes_next_months_partitions_and_drops_months_past_retention(
    scratch_db: tuple[str, str], start_gateway: Callable[..., ThreadedGateway], tmp_path: Path
) -> None:
    _, url = scratch_db
    engine = create_engine(url, tmp_path)
    coming = next_month(datetime.now(UTC).date().replace(day=1))

    async def prepare() -> None:
        try:
            async with engine.begin() as conn:
                # As if the gateway had run since early 2020 and nobody had migrated since.
                await conn.run_sync(ensure_partitions, date(2020, 1, 1), 0)
                await conn.execute(text(f"DROP TABLE {partition_name(coming)}"))
            await write_batch(engine, Batch.of([make_event(created_at=datetime(2020, 1, 5, tzinfo=UTC))]))
        finally:
            await engine.dispose()

    asyncio.run(prepare())

    def present() -> list[str]:
        async def read() -> list[str]:
            try:
                return await _partitions(engine)
            finally:
                await engine.dispose()

        return asyncio.run(read())

    assert partition_name(coming) not in present()
    start_gateway(database_url=url, usage_retention_days=365)
    wait_until(
        lambda: (
            (names := present()) and partition_name(coming) in names and "usage_events_p202001" not in names
        ),
        timeout=10,
    )
    # The month is gone from the events, not from usage_daily.
    requests = asyncio.run(_daily_requests(url, tmp_path, date(2020, 1, 5)))
    assert requests == 1


async def _daily_requests(url: str, tmp_path: Path, day: date) -> int:
    engine = create_engine(url, tmp_path)
    try:
        async with engine.connect() as conn:
            value = (
                await conn.execute(text("SELECT sum(requests) FROM usage_daily WHERE day = :d"), {"d": day})
            ).scalar()
        return int(value or 0)
    finally:
        await engine.dispose()
