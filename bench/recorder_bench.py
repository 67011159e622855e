"""Usage recorder throughput on a fresh local Postgres database, printed next to a reference measured in
the same run: one asyncpg copy_records_to_table of the same rows into a table with the same indexes,
which is about as fast as Postgres takes these rows at all.

    .venv/bin/python bench/recorder_bench.py [--events 200000] [--admin-url postgresql://...]

The recorder's figure runs from the first submit() until the last event is committed, with its
usage_daily upserts; the producer backs off while the queue holds more than a few batches, so it
measures sustained throughput rather than the spool.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from harness import bench_db_backends_cpu
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from app.db.engine import async_url, create_engine
from app.db.events import UsageEvent, epoch_us
from app.db.migrate import upgrade
from app.db.usage_writer import TABLE_COLUMNS
from app.metering.recorder import Recorder

DEFAULT_ADMIN_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def synthetic_events(n: int, seed: int = 7, ids: str = "gateway") -> list[UsageEvent]:
    """A day of calls in time order. Request ids as the gateway makes them (the milliseconds first, then
    random bits: request_context.new_request_id), or with `ids="random"` 128 random bits, as before."""
    rng = random.Random(seed)
    start = datetime.now(UTC) - timedelta(days=1)
    features = [None, "chat", "search", "summarise", "support-bot", "agent", "classify", "extract"]
    models = ["gpt-4o", "gpt-4o-mini", "o3-mini", "text-embedding-3-small"]
    events = []
    for i in range(n):
        prompt, completion = rng.randint(5, 8000), rng.randint(0, 1500)
        created_at = start + timedelta(seconds=86400 * i / n)
        if ids == "random":
            request_id = f"req_{rng.getrandbits(128):032x}"
        else:
            request_id = f"req_{epoch_us(created_at) // 1000:012x}{rng.getrandbits(80):020x}"
        events.append(
            UsageEvent(
                request_id=request_id,
                created_at=created_at,
                api_key_id=f"key_{rng.randint(1, 30)}",
                feature=rng.choice(features),
                user_id=f"user_{rng.randint(1, 2000)}" if rng.random() < 0.8 else None,
                endpoint="/v1/chat/completions",
                model=rng.choice(models),
                upstream_model="gpt-4o-2024-08-06",
                stream=i % 2 == 0,
                status_code=200 if rng.random() < 0.97 else 429,
                attempts=1 if rng.random() < 0.9 else 2,
                prompt_tokens=prompt,
                completion_tokens=completion,
                total_tokens=prompt + completion,
                cached_tokens=prompt // 3,
                reasoning_tokens=0,
                usage_source="upstream",
                cost_units=(prompt * 250 + completion * 1000) * 10,
                latency_ms=rng.randint(80, 9000),
                ttfb_ms=rng.randint(20, 900),
                error_type=None,
            )
        )
    return events


async def run_recorder(
    engine: AsyncEngine, events: list[UsageEvent], spool_dir: Path, batch_size: int
) -> tuple[float, float]:
    """Seconds from the first submit until every event is committed, and the CPU seconds Postgres's
    backends spent on them meanwhile."""
    recorder = Recorder(engine, spool_dir, batch_size=batch_size)
    await recorder.start()
    database = engine.url.database or ""
    db_cpu = bench_db_backends_cpu(database)
    started = time.perf_counter()
    for i in range(0, len(events), batch_size):
        for event in events[i : i + batch_size]:
            recorder.submit(event.to_line())
        # Backpressure, as a steady request rate would give: a burst would overflow into the spool.
        while True:
            await asyncio.sleep(0.001)
            if recorder.queue_depth() <= 4 * batch_size:
                break
    while recorder.events_written < len(events):
        # A slow write's copy in the spool is part of the recorder's work; reading events back is not.
        if recorder.events_replayed or recorder.write_errors:
            raise RuntimeError(f"the recorder fell back to its spool: {recorder.stats()}")
        await asyncio.sleep(0.002)
    elapsed = time.perf_counter() - started
    db_cpu = bench_db_backends_cpu(database) - db_cpu
    await recorder.close(30)
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT count(*) FROM usage_events"))).scalar_one()
        requests = (await conn.execute(text("SELECT sum(requests) FROM usage_daily"))).scalar_one()
    if rows != len(events) or requests != len(events):
        raise RuntimeError(f"expected {len(events)} rows and requests, found {rows} and {requests}")
    return elapsed, db_cpu


async def run_reference(engine: AsyncEngine, events: list[UsageEvent]) -> float:
    async with engine.connect() as conn:
        pg = (await conn.get_raw_connection()).driver_connection
        assert pg is not None
        await pg.execute("CREATE TABLE copy_reference (LIKE usage_events INCLUDING ALL)")
        started = time.perf_counter()
        # The rows as usage_events holds them: the cost in dollars.
        records = [e._replace(cost_units=e.cost_usd) for e in events]
        await pg.copy_records_to_table("copy_reference", records=records, columns=TABLE_COLUMNS)
        return time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--admin-url", default=DEFAULT_ADMIN_URL, help="where to CREATE DATABASE")
    parser.add_argument(
        "--ids", choices=("gateway", "random"), default="gateway", help="request ids time-ordered or not"
    )
    args = parser.parse_args()

    events = synthetic_events(args.events, ids=args.ids)
    name = f"bench_recorder_{uuid.uuid4().hex[:10]}"
    admin = create_async_engine(
        async_url(args.admin_url, Path()), isolation_level="AUTOCOMMIT", poolclass=NullPool
    )
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(args.admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            await asyncio.to_thread(upgrade, url, Path(tmp))
            engine = create_engine(url, Path(tmp))
            try:
                recorder_s, db_cpu_s = await run_recorder(
                    engine, events, Path(tmp) / "spool", args.batch_size
                )
                reference_s = await run_reference(engine, events)
            finally:
                await engine.dispose()
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()

    n = len(events)
    print(f"recorder:  {n:,} events in {recorder_s:.2f} s = {n / recorder_s:>9,.0f} events/s", end="")
    print(f"  (Recorder.submit -> usage_events + usage_daily, batches of {args.batch_size:,})")
    print(f"reference: {n:,} events in {reference_s:.2f} s = {n / reference_s:>9,.0f} events/s", end="")
    print("  (one asyncpg copy_records_to_table, same rows, same indexes, no rollup)")
    print(f"recorder / reference = {reference_s / recorder_s:.2f}")
    print(f"Postgres CPU a usage event (recorder): {1e6 * db_cpu_s / n:.1f} us ({args.ids} request ids)")


if __name__ == "__main__":
    asyncio.run(main())
