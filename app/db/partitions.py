"""usage_events partitioned by month on Postgres (migration 0011), and retention by whole months.

A month's partition is made ahead of time by `llm-gateway migrate` and by every gateway process in the
background, so inserts never meet a month without one; an event outside every month partition (a clock
far off, a spool replayed after its month was dropped) lands in the default partition rather than being
refused. Retention drops whole partitions: at hundreds of millions of rows a DELETE would write every
dead row to the WAL, leave the table as large as before and run for hours; DROP TABLE of a month
returns its disk at once. usage_daily keeps the sums of the dropped months.

A table converted from an unpartitioned one by migration 0011 keeps its old rows where they were: the old
table became one partition, `usage_events_before_YYYYMM`, holding everything before that month, and
month partitions start there. Retention drops it whole once its last month is past the cut.

The embedded SQLite database has no partitions: there retention deletes the rows.

Statements run on a synchronous Connection (Alembic's, or an AsyncConnection's run_sync), inside the
caller's transaction, under one advisory lock, so that replicas doing the same at the same moment take
turns instead of racing to create one table twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import delete, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.models import usage_events

log = logging.getLogger("gateway.partitions")

TABLE = "usage_events"
DEFAULT_PARTITION = "usage_events_default"
# The current month and this many after it always have a partition.
MONTHS_AHEAD = 3
_NAME = re.compile(r"^usage_events_p(\d{4})(\d{2})$")
_BEFORE = re.compile(r"^usage_events_before_(\d{4})(\d{2})$")
# Any constant shared by all gateway processes; "llmp" in ASCII.
_LOCK_KEY = 0x6C6C6D70
# DDL on usage_events waits at most this long for its lock: queued behind a long dashboard query, it
# would hold up every insert queued behind it. It is tried again at the next round instead.
_LOCK_TIMEOUT = "5s"


def next_month(month: date) -> date:
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


def partition_name(month: date) -> str:
    return f"{TABLE}_p{month:%Y%m}"


def before_partition_name(bound: date) -> str:
    """The partition of the rows a table had when it was partitioned: everything before `bound`."""
    return f"{TABLE}_before_{bound:%Y%m}"


def _bound(day: date) -> str:
    return f"'{day.isoformat()} 00:00:00+00'"


def is_partition(name: str | None) -> bool:
    return name is not None and (
        name == DEFAULT_PARTITION or _NAME.match(name) is not None or _BEFORE.match(name) is not None
    )


def alembic_include_object(
    obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    """For schema comparisons: the partitions are made at run time, the models describe usage_events."""
    table = getattr(getattr(obj, "table", None), "name", None) if type_ != "table" else name
    return not is_partition(table)


def is_partitioned(conn: Connection) -> bool:
    if conn.dialect.name != "postgresql":
        return False
    kind = conn.execute(text("SELECT relkind::text FROM pg_class WHERE oid = to_regclass(:t)"), {"t": TABLE})
    return kind.scalar() == "p"


def _partitions(conn: Connection, pattern: re.Pattern[str]) -> dict[date, str]:
    names = conn.execute(
        text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = to_regclass(:t)"
        ),
        {"t": TABLE},
    ).scalars()
    found: dict[date, str] = {}
    for name in names:
        match = pattern.match(name)
        if match:
            found[date(int(match.group(1)), int(match.group(2)), 1)] = name
    return found


def month_partitions(conn: Connection) -> dict[date, str]:
    """The month partitions of usage_events, by their first day."""
    return _partitions(conn, _NAME)


def before_partition(conn: Connection) -> tuple[date, str] | None:
    """(the first day after its rows, its name) of the partition holding a converted table's old rows."""
    found = _partitions(conn, _BEFORE)
    return min(found.items()) if found else None


def _lock(conn: Connection) -> None:
    conn.execute(text(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'"))
    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})


def add_partition(conn: Connection, month: date) -> str:
    """The month's partition, made apart and attached: ATTACH takes a lighter lock on usage_events than
    CREATE TABLE ... PARTITION OF (inserts and queries go on), and whatever the default partition holds
    for the month moves into it first (attaching would fail otherwise). The indexes of usage_events are
    built on it as it is attached."""
    name = partition_name(month)
    end = next_month(month)
    conn.execute(text(f"CREATE TABLE {name} (LIKE {TABLE} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"))
    # ATTACH takes this lock anyway; taken first, no event for the month can reach the default partition
    # between the move and the attach (only inserts routed to the default partition wait).
    conn.execute(text(f"LOCK TABLE {DEFAULT_PARTITION} IN ACCESS EXCLUSIVE MODE"))
    conn.execute(
        text(
            f"WITH moved AS (DELETE FROM {DEFAULT_PARTITION}"
            f" WHERE created_at >= {_bound(month)} AND created_at < {_bound(end)} RETURNING *)"
            f" INSERT INTO {name} SELECT * FROM moved"
        )
    )
    bounds = f"FROM ({_bound(month)}) TO ({_bound(end)})"
    conn.execute(text(f"ALTER TABLE {TABLE} ATTACH PARTITION {name} FOR VALUES {bounds}"))
    return name


def ensure_partitions(conn: Connection, today: date, months_ahead: int = MONTHS_AHEAD) -> list[str]:
    """Partitions for today's month and the `months_ahead` after it; returns the ones made now."""
    if not is_partitioned(conn):
        return []
    _lock(conn)
    existing = month_partitions(conn)
    before = before_partition(conn)
    made = []
    month = today.replace(day=1)
    for _ in range(months_ahead + 1):
        if month not in existing and (before is None or month >= before[0]):
            made.append(add_partition(conn, month))
        month = next_month(month)
    return made


def prune(conn: Connection, before: date) -> list[str]:
    """Drop the usage events of every month that ends on or before `before` (so everything before the
    first day of its month): whole partitions on Postgres (a converted table's old rows once all of them
    are), the rows on SQLite. Returns what went."""
    first_kept = before.replace(day=1)
    if not is_partitioned(conn):
        if conn.dialect.name == "postgresql":
            raise RuntimeError("usage_events is not partitioned: run `llm-gateway migrate` first")
        cut = datetime(first_kept.year, first_kept.month, 1, tzinfo=UTC)
        deleted = conn.execute(delete(usage_events).where(usage_events.c.created_at < cut))
        return [f"{deleted.rowcount} row(s)"] if deleted.rowcount else []
    _lock(conn)
    dropped = []
    old = before_partition(conn)
    if old is not None and old[0] <= first_kept:
        conn.execute(text(f"DROP TABLE {old[1]}"))
        dropped.append(old[1])
    for month, name in sorted(month_partitions(conn).items()):
        if month < first_kept:
            conn.execute(text(f"DROP TABLE {name}"))
            dropped.append(name)
    return dropped


def maintain(conn: Connection, today: date, retention_days: int | None) -> tuple[list[str], list[str]]:
    """What the gateway does in the background: (partitions made, partitions or rows dropped)."""
    made = ensure_partitions(conn, today)
    dropped = prune(conn, today - timedelta(days=retention_days)) if retention_days else []
    return made, dropped


class PartitionKeeper:
    """Each gateway process runs `maintain` at start-up and then every `interval_s`, off the request path;
    replicas take turns under the advisory lock, and all but the first find nothing to do."""

    def __init__(self, engine: AsyncEngine, retention_days: int | None, interval_s: float = 3600.0) -> None:
        self._engine = engine
        self._retention_days = retention_days
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="usage-partitions")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def run_once(self) -> None:
        async with self._engine.begin() as conn:
            made, dropped = await conn.run_sync(maintain, datetime.now(UTC).date(), self._retention_days)
        if made or dropped:
            log.info("usage_events partitions maintained", extra={"made": made, "dropped": dropped})

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception as exc:  # the database may be away or a lock busy: the next round tries again
                log.warning("usage_events partitions not maintained", extra={"error": type(exc).__name__})
            await asyncio.sleep(self._interval_s)
