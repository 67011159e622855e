"""usage_events at size: the partitioned table filled with --rows events over twelve months (generated in
SQL with generate_series, not through the gateway; spread evenly in time, so the current month holds the
days gone so far), then measured:

- the recorder's insert rate (write_batch: the batch's lines in one INSERT ... ON CONFLICT with the
  usage_daily upsert, batches of 2,000) into the current month's partition, beside the same into the
  empty table at the start of the run, and the WAL it writes per event (pg_current_wal_lsn before and
  after: the cluster's WAL, so a Postgres that other work writes to meanwhile inflates it);
- the README's dashboard queries (usage_daily, and the last generated day's events per feature: "today"
  is the day the generation ended, so a run crossing midnight still reads a full day), median and
  slowest of 5;
- size on disk per million events: heap, indexes, and usage_daily.

    nice -n 19 .venv/bin/python bench/usage_table_bench.py [--rows 10000000] [--admin-url postgresql://...]
        [--unlogged-history] [--fill-minutes M]

With --conversion it times migration 0011 instead: --rows events generated in the table as it was before
partitioning, then the migration, with an insert and a read probing the table every 50 ms meanwhile
(their longest wait is how long the table was locked for the gateway and for a dashboard). Point
GATEWAY_MIGRATIONS_DIR at another migrations/ folder to time another version of it.

It makes a database of its own and drops it at the end. Each month is generated into a bare table and
attached as its partition, which builds its indexes in bulk: the end state of a table grown over a year,
made several times faster than by inserting through the indexes. Months are generated newest first;
--fill-minutes stops the generation when the time is up and measures what is there (the figures name
the rows actually generated). --unlogged-history makes the months before the current one UNLOGGED (no
WAL for the generation; their size and the queries over them are the same, and the insert rate is
measured into the current month, which stays logged): for a scratch database only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import time
import uuid
from datetime import UTC, date, datetime
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
from alembic import command
from alembic.script import ScriptDirectory
from recorder_bench import synthetic_events
from sqlalchemy.engine import make_url

from app.db.engine import create_engine
from app.db.events import Batch
from app.db.migrate import MIGRATIONS_DIR, alembic_config, upgrade
from app.db.partitions import ensure_partitions, next_month, partition_name
from app.db.usage_writer import write_batch

DEFAULT_ADMIN_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
MONTHS = 12

# One month of events: `n` calls spread evenly over [start, end), time-ordered request ids as the gateway
# makes them, 50 features, 2,000 users, 30 keys, 5 models, 1% errors.
GENERATE = """
INSERT INTO {table} (id, created_at, request_id, api_key_id, feature, user_id, endpoint, model,
    upstream_model, stream, status_code, attempts, prompt_tokens, completion_tokens, total_tokens,
    cached_tokens, reasoning_tokens, usage_source, cost_usd, latency_ms, ttfb_ms, error_type)
SELECT $3::bigint + g + 1, ts, 'req_' || lpad(to_hex((extract(epoch FROM ts) * 1000)::bigint), 12, '0')
           || left(md5(($3::bigint + g)::text), 20),
       'key_' || (g % 30), 'feature-' || (g % 50), 'user-' || ((g * 7919) % 2000),
       CASE WHEN g % 10 = 0 THEN '/v1/embeddings' ELSE '/v1/chat/completions' END,
       (ARRAY['gpt-4o-mini', 'gpt-4o', 'gpt-4.1', 'o3-mini', 'text-embedding-3-small'])[1 + g % 5],
       (ARRAY['gpt-4o-mini-2024-07-18', 'gpt-4o-2024-08-06', 'gpt-4.1', 'o3-mini', 'text-embedding-3-small'])
           [1 + g % 5],
       g % 3 = 0, CASE WHEN g % 100 = 0 THEN 504 ELSE 200 END, 1 + (g % 100 = 0)::int,
       p, c, p + c, CASE WHEN g % 4 = 0 THEN p / 2 ELSE 0 END, 0, 'upstream',
       (p * 2.5 + c * 10) / 1e6, 200 + g % 3000, 80 + g % 400,
       CASE WHEN g % 100 = 0 THEN 'upstream_timeout' END
FROM (SELECT g, $1::timestamptz + (($2::timestamptz - $1::timestamptz) * g / $4) AS ts,
             100 + (g * 31) % 4000 AS p, (g * 17) % 900 AS c
      FROM generate_series(0::bigint, $4::bigint - 1) AS g) AS s
"""

ROLLUP = """
INSERT INTO usage_daily (day, feature, user_id, model, requests, prompt_tokens, completion_tokens,
    total_tokens, cost_usd)
SELECT (created_at AT TIME ZONE 'UTC')::date, coalesce(feature, ''), coalesce(user_id, ''),
       coalesce(model, ''), count(*), sum(prompt_tokens), sum(completion_tokens), sum(total_tokens),
       coalesce(sum(cost_usd), 0)
FROM {table} GROUP BY 1, 2, 3, 4
"""

# The README's dashboard queries, as it prints them.
DASHBOARD = {
    "cost per feature per day, 30 days (usage_daily)": """
        SELECT day, NULLIF(feature, '') AS feature, SUM(requests) AS requests, SUM(cost_usd) AS cost_usd
        FROM usage_daily WHERE day >= CURRENT_DATE - 29 GROUP BY day, feature ORDER BY day, cost_usd DESC""",
    "top users this month (usage_daily)": """
        SELECT NULLIF(user_id, '') AS user_id, SUM(requests) AS requests, SUM(total_tokens) AS tokens,
               SUM(cost_usd) AS cost_usd
        FROM usage_daily WHERE day >= date_trunc('month', CURRENT_DATE)::date
        GROUP BY user_id ORDER BY cost_usd DESC LIMIT 20""",
    "tokens and cost by model, 30 days (usage_daily)": """
        SELECT model, SUM(requests) AS requests, SUM(prompt_tokens) AS prompt_tokens,
               SUM(completion_tokens) AS completion_tokens, SUM(total_tokens) AS total_tokens,
               SUM(cost_usd) AS cost_usd
        FROM usage_daily WHERE day >= CURRENT_DATE - 29 GROUP BY model ORDER BY cost_usd DESC""",
    "errors, latency, cache per feature today (usage_events)": """
        SELECT feature, COUNT(*) AS requests,
               COUNT(*) FILTER (WHERE status_code >= 400 OR error_type IS NOT NULL) AS failed,
               percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS p95_latency_ms,
               SUM(cached_tokens)::float / NULLIF(SUM(prompt_tokens), 0) AS cached_share
        FROM usage_events WHERE created_at >= date_trunc('day', $1::timestamptz)
        GROUP BY feature ORDER BY requests DESC""",
}


def _months_back(today: date, n: int) -> list[date]:
    first = today.replace(day=1)
    months = []
    for back in range(n - 1, -1, -1):
        year, month = first.year, first.month - back
        while month < 1:
            year, month = year - 1, month + 12
        months.append(date(year, month, 1))
    return months


def _plan(rows: int, now: datetime) -> list[tuple[date, datetime, datetime, int, int]]:
    """(month, its first instant, its end or now, events in it, events before it) for the twelve months to
    now, each month's share in proportion to its time."""
    months = _months_back(now.date(), MONTHS)
    starts = [datetime(m.year, m.month, 1, tzinfo=UTC) for m in months]
    ends = [*starts[1:], now]
    span = (now - starts[0]).total_seconds()
    counts = [
        int(rows * (end - start).total_seconds() / span) for start, end in zip(starts, ends, strict=True)
    ]
    counts[-1] += rows - sum(counts)
    # Ids in time order, as the gateway's identity gives them.
    offsets = [sum(counts[:i]) for i in range(len(counts))]
    return list(zip(months, starts, ends, counts, offsets, strict=True))


async def fill(
    conn: asyncpg.Connection, rows: int, now: datetime, unlogged_history: bool, deadline: float
) -> int:
    """Generates the events month by month, newest first; returns how many were made (fewer than `rows`
    when the deadline came first)."""
    current = now.date().replace(day=1)
    done = 0
    for month, start, end, n, offset in reversed(_plan(rows, now)):
        if time.monotonic() > deadline:
            print(f"  {month:%Y-%m}: not generated, time is up", flush=True)
            continue
        t0 = time.perf_counter()
        name = partition_name(month)
        unlogged = "UNLOGGED " if unlogged_history and month != current else ""
        await conn.execute(f"DROP TABLE {name}")  # the empty partition made ahead
        await conn.execute(
            f"CREATE {unlogged}TABLE {name} (LIKE usage_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
        )
        await conn.execute(GENERATE.format(table=name), start, end, offset, n)
        generated = time.perf_counter() - t0
        bounds = (
            f"FROM ('{month.isoformat()} 00:00:00+00') TO ('{next_month(month).isoformat()} 00:00:00+00')"
        )
        await conn.execute(f"ALTER TABLE usage_events ATTACH PARTITION {name} FOR VALUES {bounds}")
        indexed = time.perf_counter() - t0 - generated
        await conn.execute(ROLLUP.format(table=name))
        done += n
        print(
            f"  {month:%Y-%m}: {n:,} rows {unlogged.strip().lower()} in {time.perf_counter() - t0:.0f} s"
            f" (generated {generated:.0f} s, indexed {indexed:.0f} s; {done:,} so far)",
            flush=True,
        )
    await conn.execute(
        "SELECT setval(pg_get_serial_sequence('usage_events', 'id'), $1::bigint + 1, false)", rows
    )
    return done


async def sizes(conn: asyncpg.Connection) -> dict[str, int]:
    row = await conn.fetchrow(
        """
        SELECT sum(pg_relation_size(c.oid)) AS heap, sum(pg_indexes_size(c.oid)) AS indexes,
               sum(pg_total_relation_size(c.oid)) AS total
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'usage_events'::regclass
        """
    )
    daily = await conn.fetchval("SELECT pg_total_relation_size('usage_daily')")
    return {
        "heap": int(row["heap"]),
        "indexes": int(row["indexes"]),
        "total": int(row["total"]),
        "daily": daily,
    }


async def insert_rate(url: str, batches: int, batch_size: int) -> tuple[float, float, float]:
    """(events a second, WAL bytes an event in the first half after a CHECKPOINT, in the second half)
    through the recorder's write path. The first write of a page after a checkpoint puts its whole image in
    the WAL; the second half shows the steady state between checkpoints."""
    engine = create_engine(url, Path())
    events = synthetic_events(batches * batch_size, seed=11)
    prepared = [Batch.of(events[i : i + batch_size]) for i in range(0, len(events), batch_size)]
    plain = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(plain)
    try:
        await write_batch(engine, prepared[0])  # warm: the staging table, the prepared statements
        await conn.execute("CHECKPOINT")
        halves = [prepared[1 : len(prepared) // 2], prepared[len(prepared) // 2 :]]
        wal: list[float] = []
        written = 0
        elapsed = 0.0
        for half in halves:
            lsn = await conn.fetchval("SELECT pg_current_wal_lsn()")
            t0 = time.perf_counter()
            n = 0
            for batch in half:
                n += await write_batch(engine, batch)
            elapsed += time.perf_counter() - t0
            wal_bytes = await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1)", lsn)
            wal.append(float(wal_bytes) / n)
            written += n
    finally:
        await conn.close()
        await engine.dispose()
    return written / elapsed, wal[0], wal[1]


async def dashboard(
    conn: asyncpg.Connection, today: datetime, runs: int = 5
) -> dict[str, tuple[float, float, int]]:
    results = {}
    for name, sql in DASHBOARD.items():
        args = (today,) if "$1" in sql else ()
        await conn.fetch(sql, *args)  # warm the cache, as a dashboard refreshing does
        times, rows = [], 0
        for _ in range(runs):
            t0 = time.perf_counter()
            rows = len(await conn.fetch(sql, *args))
            times.append((time.perf_counter() - t0) * 1000)
        results[name] = (statistics.median(times), max(times), rows)
    return results


async def fill_unpartitioned(conn: asyncpg.Connection, rows: int, now: datetime) -> None:
    """The table as it was before partitioning, holding `rows` events: its keys and indexes dropped for
    the generation and built again after it, in bulk."""
    keys = await conn.fetch(
        "SELECT conname, pg_get_constraintdef(oid) AS definition FROM pg_constraint"
        " WHERE conrelid = 'usage_events'::regclass AND contype IN ('p', 'u')"
    )
    indexes = await conn.fetch(
        "SELECT indexrelid::regclass::text AS name, pg_get_indexdef(indexrelid) AS definition FROM pg_index"
        " WHERE indrelid = 'usage_events'::regclass"
        " AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = indexrelid)"
    )
    for index in indexes:
        await conn.execute(f"DROP INDEX {index['name']}")
    for key in keys:
        await conn.execute(f"ALTER TABLE usage_events DROP CONSTRAINT {key['conname']}")
    t0 = time.perf_counter()
    for month, start, end, n, offset in _plan(rows, now):
        await conn.execute(GENERATE.format(table="usage_events"), start, end, offset, n)
        print(f"  {month:%Y-%m}: {n:,} rows", flush=True)
    generated = time.perf_counter() - t0
    for key in keys:
        await conn.execute(f"ALTER TABLE usage_events ADD CONSTRAINT {key['conname']} {key['definition']}")
    for index in indexes:
        await conn.execute(index["definition"])
    await conn.execute(
        "SELECT setval(pg_get_serial_sequence('usage_events', 'id'), $1::bigint + 1, false)", rows
    )
    await conn.execute("VACUUM ANALYZE usage_events")
    rest = time.perf_counter() - t0 - generated
    print(f"  generated in {generated:.0f} s, keys, indexes and vacuum in {rest:.0f} s", flush=True)


async def probe(url: str, stop: asyncio.Event, every_s: float = 0.05) -> dict[str, list[float]]:
    """What the gateway and a dashboard see while the table is converted: an insert of one event and a
    read of the last minute's events, each on its own connection, every `every_s`; how long each took,
    seen from here (a wait for a lock is not in the server's statement time: a prepared statement takes
    its locks before its execution starts). On a busy machine this process's own wait for a CPU is in it
    too: the median shows how much."""
    writer, reader = await asyncpg.connect(url), await asyncpg.connect(url)
    seen: dict[str, list[float]] = {"insert": [], "read": []}
    try:
        n = 0
        while not stop.is_set():
            n += 1
            t0 = time.perf_counter()
            await writer.execute(
                "INSERT INTO usage_events (created_at, request_id, endpoint, stream, status_code, attempts,"
                " usage_source, latency_ms) VALUES (now(), $1, '/v1/chat/completions', false, 200, 1,"
                " 'upstream', 10)",
                f"req_probe_{n}",
            )
            t1 = time.perf_counter()
            await reader.fetchval(
                "SELECT count(*) FROM usage_events WHERE created_at >= now() - interval '1 minute'"
            )
            seen["insert"].append(t1 - t0)
            seen["read"].append(time.perf_counter() - t1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)
    finally:
        await writer.close()
        await reader.close()
    return seen


async def measure_conversion(url: str, rows: int) -> None:
    """Migration 0011 on a table of `rows` events, timed, with the inserts and reads that went on
    meanwhile: the longest each waited is how long the table was locked for them."""
    config = alembic_config(url, Path())
    before = ScriptDirectory.from_config(config).get_revision("0011").down_revision
    await asyncio.to_thread(command.upgrade, config, str(before))
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET maintenance_work_mem = '512MB'")
        print(f"generating {rows:,} events in the unpartitioned table ({MIGRATIONS_DIR})", flush=True)
        await fill_unpartitioned(conn, rows, datetime.now(UTC))
        size = await conn.fetchval("SELECT pg_total_relation_size('usage_events')")
    finally:
        await conn.close()
    stop = asyncio.Event()
    probing = asyncio.create_task(probe(url, stop))
    await asyncio.sleep(1)  # the probes' baseline before the migration starts
    t0 = time.perf_counter()
    await asyncio.to_thread(command.upgrade, config, "0011")
    took = time.perf_counter() - t0
    await asyncio.sleep(1)
    stop.set()
    seen = await probing
    print(f"\nmigration 0011 on {rows:,} events ({size / 2**30:.1f} GiB): {took:.1f} s in all")
    for kind, durations in seen.items():
        slow = sorted(durations)
        print(
            f"  {kind} probes: {len(slow)}; median {statistics.median(slow) * 1000:.1f} ms,"
            f" 99th percentile {slow[int(len(slow) * 0.99)] * 1000:.0f} ms, longest {slow[-1] * 1000:.0f} ms;"
            f" {sum(d > 1 for d in slow)} over 1 s"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--batches", type=int, default=50, help="recorder batches timed (of 2,000 events)")
    parser.add_argument("--admin-url", default=DEFAULT_ADMIN_URL)
    parser.add_argument("--unlogged-history", action="store_true", help="scratch databases only")
    parser.add_argument("--fill-minutes", type=float, default=None, help="stop generating after this")
    parser.add_argument("--conversion", action="store_true", help="time migration 0011 on --rows instead")
    args = parser.parse_args()

    name = f"bench_usage_{uuid.uuid4().hex[:8]}"
    admin_url = make_url(args.admin_url).set(drivername="postgresql").render_as_string(hide_password=False)
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        if args.conversion:
            await measure_conversion(url, args.rows)
        else:
            await measure_table(url, name, args)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        print(f"dropped database {name}")


async def measure_table(url: str, name: str, args: argparse.Namespace) -> None:
    deadline = time.monotonic() + args.fill_minutes * 60 if args.fill_minutes else float("inf")
    await asyncio.to_thread(upgrade, url, Path())
    conn = await asyncpg.connect(url)
    try:
        now = datetime.now(UTC)
        engine = create_engine(url, Path())
        async with engine.begin() as sa_conn:
            for month in _months_back(now.date(), MONTHS):
                await sa_conn.run_sync(ensure_partitions, month, 0)
        await engine.dispose()
        # The same writes into the empty table first, for a reference taken under the same load.
        empty_rate, _, _ = await insert_rate(url, args.batches, 2000)
        await conn.execute("TRUNCATE usage_events, usage_daily")
        print(f"database {name}: generating {args.rows:,} events over {MONTHS} months", flush=True)
        await conn.execute("SET maintenance_work_mem = '512MB'")
        t0 = time.perf_counter()
        generated = await fill(conn, args.rows, now, args.unlogged_history, deadline)
        print(f"  generated and rolled up in {time.perf_counter() - t0:.0f} s; analysing", flush=True)
        t0 = time.perf_counter()
        # The current month is vacuumed (its visibility map lets the day's query scan indexes only, as
        # autovacuum would have); the others are analysed only: vacuuming years of history is what
        # a freshly generated table would need, not one grown over time.
        await conn.execute("ANALYZE usage_events")
        await conn.execute(f"VACUUM ANALYZE {partition_name(now.date().replace(day=1))}")
        await conn.execute("VACUUM ANALYZE usage_daily")
        print(f"  analysed in {time.perf_counter() - t0:.0f} s", flush=True)
        size = await sizes(conn)
        daily_rows = await conn.fetchval("SELECT count(*) FROM usage_daily")
        current = await conn.fetchval(
            "SELECT count(*) FROM usage_events WHERE created_at >= date_trunc('month', now())"
        )
        rate, wal_first, wal_steady = await insert_rate(url, args.batches, 2000)
        queries = await dashboard(conn, now)
    finally:
        await conn.close()
    million = generated / 1e6
    print(f"\nusage_events: {generated:,} events; this month's partition {current:,}")
    print(f"usage_daily: {daily_rows:,} rows")
    per = {name: size[name] / million / 2**20 for name in ("total", "heap", "indexes")}
    print(
        f"on disk per million events: {per['total']:.0f} MiB (heap {per['heap']:.0f} MiB,"
        f" indexes {per['indexes']:.0f} MiB); all events {size['total'] / 2**30:.2f} GiB;"
        f" usage_daily {size['daily'] / 2**20:.0f} MiB"
    )
    print(
        f"recorder insert rate: {rate:,.0f} events/s ({args.batches} batches of 2,000, rollup included);"
        f" into the empty table, same run: {empty_rate:,.0f} events/s"
    )
    print(
        f"WAL per event written: {wal_first:,.0f} bytes just after a CHECKPOINT (full-page images),"
        f" {wal_steady:,.0f} bytes after that"
    )
    for query, (median, slowest, rows) in queries.items():
        print(f"  {query}: median {median:.1f} ms, slowest {slowest:.1f} ms ({rows} rows)")


if __name__ == "__main__":
    asyncio.run(main())
