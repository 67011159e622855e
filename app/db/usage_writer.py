"""Write a batch of usage events and their usage_daily increments in one transaction.

Only the events actually inserted (ON CONFLICT ... DO NOTHING ... RETURNING) are added to usage_daily, so
a replayed batch neither duplicates a row nor double counts a total. The conflict key is (request_id,
created_at), as usage_events is partitioned by created_at on Postgres (a unique key there must hold the
partition key): an event's created_at is fixed when it is made and travels with it through the spool,
so its replay conflicts with the row it wrote.

Postgres: one statement. The batch's lines (events.py) go as they are, one bytea parameter; the
statement splits them, takes the fields out of each line, inserts the events and adds the rows it
inserted to usage_daily, atomically as any single statement is. The gateway encodes nothing per row
(asyncpg's encoding of each event's fields cost it ~1.6 us an event), and a batch is one round trip
(on a connection the recorder keeps, `UsageWriter`, without the pool's ping): each round trip waits for
a pass of the gateway's event loop, which under load takes milliseconds (a COPY into a temp table in a
transaction took seven, and more of Postgres's CPU; docs/performance-log.md, "Twentieth round").
Summing the rollup in that statement instead of in Python keeps the aggregation off the gateway's event
loop.
SQLite (no data-modifying CTEs): the lines are parsed here, the inserted request_ids come back and Python
sums them, then the same INSERT ... ON CONFLICT DO UPDATE.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import UTC, date
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.db.events import COST_EXPONENT, Batch, UsageEvent, cost_to_usd
from app.db.models import usage_daily, usage_events

EVENT_COLUMNS = UsageEvent._fields
# Amounts the events hold as integer 1e-10 USD units, and the numeric columns they fill.
_MONEY_COLUMNS = {"cost_units": "cost_usd", "reserved_units": "reserved_usd"}
# usage_events' columns, in the order of EVENT_COLUMNS.
TABLE_COLUMNS = tuple(_MONEY_COLUMNS.get(c, c) for c in EVENT_COLUMNS)

_DAILY_KEY = ("day", "feature", "user_id", "model")
_DAILY_SUMS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd")


def _field(index: int, name: str) -> str:
    value = f"(line->>{index})"
    if name in _MONEY_COLUMNS:
        # An amount arrives as an integer number of units and becomes dollars here.
        return f"{value}::bigint * 1e{COST_EXPONENT}::numeric"
    if name == "created_at":
        # Microseconds since the Unix epoch: exact (below 2**53 until the year 2255).
        return f"timestamptz 'epoch' + {value}::bigint * interval '1 microsecond'"
    sql_type = usage_events.c[name].type.compile(dialect=PGDialect())  # type: ignore[no-untyped-call]
    typed = value if sql_type == "TEXT" else f"{value}::{sql_type}"
    default = UsageEvent._field_defaults.get(name)
    if isinstance(default, int):
        # A line spooled by an older version lacks the newer fields: their default, not NULL.
        return f"coalesce({typed}, {str(default).lower()})"
    return typed


_FIELDS = ", ".join(_field(i, name) for i, name in enumerate(EVENT_COLUMNS))
# DISTINCT ON: one event per request_id (a replayed spool can repeat one within a batch). ORDER BY, in the
# events and in the rollup: every writer takes its locks in the same order, so two gateway workers
# writing the same rows wait for each other instead of deadlocking. The data-modifying CTEs run exactly
# once whatever the final SELECT reads.
# The lines split at their newlines: JSON text holds none raw (orjson escapes every control character).
# MATERIALIZED, so each line is parsed once: inlined, every field's `line->>i` parsed its line again.
_PG_WRITE = f"""
WITH lines AS MATERIALIZED (
    SELECT raw::jsonb AS line FROM unnest(string_to_array(convert_from($1, 'UTF8'), E'\\n')) AS raw
    WHERE raw <> ''
), inserted AS (
    INSERT INTO usage_events ({", ".join(TABLE_COLUMNS)})
    SELECT DISTINCT ON (line->>0) {_FIELDS} FROM lines ORDER BY line->>0
    ON CONFLICT (request_id, created_at) DO NOTHING
    RETURNING created_at, feature, user_id, model, prompt_tokens, completion_tokens, total_tokens, cost_usd
), rollup AS (
    INSERT INTO usage_daily AS d ({", ".join(_DAILY_KEY + _DAILY_SUMS)})
    SELECT (created_at AT TIME ZONE 'UTC')::date, coalesce(feature, ''), coalesce(user_id, ''),
           coalesce(model, ''), count(*), sum(prompt_tokens), sum(completion_tokens), sum(total_tokens),
           coalesce(sum(cost_usd), 0)
    FROM inserted GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
    ON CONFLICT ({", ".join(_DAILY_KEY)}) DO UPDATE SET
        {", ".join(f"{c} = d.{c} + excluded.{c}" for c in _DAILY_SUMS)}
)
SELECT count(*) FROM inserted
"""

# Postgres SQLSTATE classes meaning "these rows are wrong", not "the database is unavailable":
# 22 data exception (a NUL byte in text, a number out of range), 23 integrity constraint violation,
# 54 program limit exceeded (a key too long for a btree index row).
_REJECTED_SQLSTATE_CLASSES = frozenset({"22", "23", "54"})


async def write_batch(engine: AsyncEngine, batch: Batch) -> int:
    """Insert the events not stored yet and add exactly those to usage_daily, in one transaction.
    Returns how many were inserted."""
    async with engine.connect() as conn:
        return await _write(conn, batch)


class UsageWriter:
    """write_batch for a steady stream of batches (the recorder's): on connections kept from one write
    to the next, up to `keep` of them, rather than each checked out of the pool for its write.

    On Postgres the pool pings a connection at each checkout, and asyncpg's ping is three round trips
    (BEGIN, the ping, ROLLBACK) before the write's one, each waiting for a pass of the gateway's event
    loop. At 256 connections of load that made most writes outlast the recorder's hedge (half a flush
    interval), so most batches were also copied to the spool, fsynced and deleted (docs/performance-log.md,
    "Twenty-second round"). A write that fails on a kept connection for any reason but its rows (the
    server closed it while it was kept: a restart, an idle timeout) is made once more on a connection
    from the pool, pinged; a write inserts nothing twice. SQLite's pool does not ping: there each write
    checks out a connection, as write_batch does."""

    def __init__(self, engine: AsyncEngine, keep: int) -> None:
        self._engine = engine
        self._keep = keep if engine.dialect.name == "postgresql" else 0
        self._kept: list[AsyncConnection] = []

    async def write(self, batch: Batch) -> int:
        """write_batch's insert; raises as it does."""
        if self._kept:
            try:
                return await self._write_on(self._kept.pop(), batch)
            except Exception as exc:
                if is_rejected_data(exc):
                    raise
        return await self._write_on(await self._engine.connect(), batch)

    async def close(self) -> None:
        """Give the kept connections back to the pool (before the engine is disposed of)."""
        kept, self._kept = self._kept, []
        for conn in kept:
            # One the server has dropped is discarded by the pool all the same.
            with contextlib.suppress(Exception):
                await conn.close()

    async def _write_on(self, conn: AsyncConnection, batch: Batch) -> int:
        try:
            inserted = await _write(conn, batch)
        except BaseException:
            await conn.close()
            raise
        if len(self._kept) < self._keep:
            self._kept.append(conn)
        else:
            await conn.close()
        return inserted


async def _write(conn: AsyncConnection, batch: Batch) -> int:
    try:
        if conn.dialect.name == "postgresql":
            return await _write_postgres(conn, batch)
        return await _write_sqlite(conn, _prepare(batch.events()))
    except BaseException:
        # The connection may be mid-statement (a timeout cancelled us) or in an aborted transaction;
        # it must not go back to the pool.
        await conn.invalidate()
        raise


def is_rejected_data(exc: BaseException) -> bool:
    """True when the database refused the rows themselves: writing the same rows again would fail
    again, so the caller must isolate them instead of retrying. False means "unavailable": retry."""
    if isinstance(exc, sa_exc.DataError | sa_exc.IntegrityError):
        return True
    if isinstance(exc, sa_exc.StatementError) and not isinstance(exc, sa_exc.DBAPIError):
        return True  # a value SQLAlchemy could not bind
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate[:2] in _REJECTED_SQLSTATE_CLASSES
    # asyncpg raises its client-side DataError (a ValueError) for a value it cannot encode.
    return isinstance(exc, ValueError | TypeError | OverflowError)


def _prepare(events: Sequence[UsageEvent]) -> list[UsageEvent]:
    """What _PG_WRITE's DISTINCT ON and ORDER BY do: one event per request_id (on SQLite both copies would
    match the RETURNING set and count twice), sorted by request_id."""
    unique: dict[str, UsageEvent] = {}
    for e in events:
        unique.setdefault(e.request_id, e)
    return [unique[k] for k in sorted(unique)]


async def _write_postgres(conn: AsyncConnection, batch: Batch) -> int:
    # asyncpg directly: one cached prepared statement, the lines passed as the bytes they are.
    pg = (await conn.get_raw_connection()).driver_connection
    assert pg is not None, "a checked-out connection has a driver connection"
    inserted: int = await pg.fetchval(_PG_WRITE, batch.data)
    return inserted


async def _write_sqlite(conn: AsyncConnection, events: list[UsageEvent]) -> int:
    insert_events = (
        sqlite.insert(usage_events)
        .on_conflict_do_nothing(index_elements=[usage_events.c.request_id, usage_events.c.created_at])
        .returning(usage_events.c.request_id)
    )
    upsert = sqlite.insert(usage_daily)
    upsert_daily = upsert.on_conflict_do_update(
        index_elements=[usage_daily.c[c] for c in _DAILY_KEY],
        set_={c: usage_daily.c[c] + upsert.excluded[c] for c in _DAILY_SUMS},
    )
    async with conn.begin():
        result = await conn.execute(
            insert_events,
            [
                dict(
                    zip(TABLE_COLUMNS, e, strict=True),
                    cost_usd=e.cost_usd,
                    reserved_usd=cost_to_usd(e.reserved_units),
                )
                for e in events
            ],
        )
        inserted = set(result.scalars())
        rows = _daily_increments([e for e in events if e.request_id in inserted])
        if rows:
            await conn.execute(upsert_daily, rows)
    return len(inserted)


def _daily_increments(events: Sequence[UsageEvent]) -> list[dict[str, Any]]:
    """What _PG_WRITE's rollup computes in SQL."""
    totals: dict[tuple[date, str, str, str], list[Any]] = {}
    for e in events:
        key = (e.created_at.astimezone(UTC).date(), e.feature or "", e.user_id or "", e.model or "")
        acc = totals.get(key)
        if acc is None:
            acc = totals[key] = [0, 0, 0, 0, 0]
        acc[0] += 1
        acc[1] += e.prompt_tokens
        acc[2] += e.completion_tokens
        acc[3] += e.total_tokens
        if e.cost_units is not None:
            acc[4] += e.cost_units
    return [
        dict(zip(_DAILY_KEY + _DAILY_SUMS, (*key, *acc[:4], cost_to_usd(acc[4])), strict=True))
        for key, acc in totals.items()
    ]
