"""A month of usage for the dashboard tests, written by the recorder's own writer (so `usage_daily` is kept
in step with the events exactly as in production), and a database holding it."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path

from app.db.engine import create_engine
from app.db.events import Batch, UsageEvent, usd_to_cost
from app.db.usage_writer import write_batch
from tests.db import create_database, drop_database

DAYS = 30
# USD per 1M prompt and completion tokens.
PRICES = {
    "gpt-4o": (Decimal("2.50"), Decimal("10.00")),
    "gpt-4o-mini": (Decimal("0.15"), Decimal("0.60")),
    "gpt-4.1": (Decimal("2.00"), Decimal("8.00")),
    "o3-mini": (Decimal("1.10"), Decimal("4.40")),
}
# feature -> (calls a day, its models, share of failed calls)
FEATURES: dict[str | None, tuple[int, tuple[str, ...], float]] = {
    "support-bot": (40, ("gpt-4o", "gpt-4o-mini"), 0.02),
    "search": (36, ("gpt-4o-mini",), 0.01),
    "summaries": (18, ("gpt-4.1",), 0.0),
    "code-review": (12, ("o3-mini", "gpt-4.1"), 0.03),
    "sql-helper": (9, ("gpt-4o",), 0.12),
    "email-drafts": (8, ("gpt-4o-mini",), 0.0),
    "translate": (6, ("gpt-4o-mini",), 0.0),
    "insights": (5, ("gpt-4.1",), 0.04),
    "playground": (3, ("gpt-4o",), 0.0),
    "onboarding": (2, ("gpt-4o-mini",), 0.0),
    None: (2, ("gpt-4o-mini",), 0.0),
}
USERS = [
    "maria@acme.io",
    "chen.wei@acme.io",
    "ops-batch",
    "j.okafor@acme.io",
    "priya@acme.io",
    "lukas@acme.io",
    "sofia@acme.io",
    "support-triage",
    "amir@acme.io",
    "hannah@acme.io",
    "diego@acme.io",
    "yuki@acme.io",
    "nightly-report",
    "tom@acme.io",
]


def events(now: datetime) -> list[UsageEvent]:
    """The same calls for the same `now`: the last DAYS UTC days, today's up to `now`."""
    rng = random.Random(17)
    today = now.date()
    made: list[UsageEvent] = []
    for back in range(DAYS - 1, -1, -1):
        day = today - timedelta(days=back)
        midnight = datetime.combine(day, time(), tzinfo=UTC)
        span = (now - midnight) if back == 0 else timedelta(days=1)
        # Weekdays are busier, and the month grows.
        weight = (1.0 if day.weekday() < 5 else 0.45) * (0.7 + 0.6 * (DAYS - back) / DAYS)
        for feature, (per_day, models, failing) in FEATURES.items():
            for _ in range(max(1, round(per_day * weight * rng.uniform(0.6, 1.4)))):
                made.append(_event(rng, len(made), midnight + span * rng.random(), feature, models, failing))
    return made


def _event(
    rng: random.Random, n: int, at: datetime, feature: str | None, models: tuple[str, ...], failing: float
) -> UsageEvent:
    model = rng.choice(models)
    user = None if rng.random() < 0.05 else USERS[min(int(rng.expovariate(0.28)), len(USERS) - 1)]
    failed = rng.random() < failing
    prompt = 0 if failed else int(rng.lognormvariate(9.6, 0.7))
    completion = 0 if failed else int(rng.lognormvariate(7.0, 0.6))
    cached = prompt // 4 if rng.random() < 0.3 else 0
    price_in, price_out = PRICES[model]
    cost = ((prompt * price_in + completion * price_out) / 1_000_000).quantize(Decimal("1e-10"))
    latency = int(rng.lognormvariate(6.9, 0.5)) if not failed else int(rng.uniform(50, 30_000))
    return UsageEvent(
        request_id=f"req_seed{n:08d}",
        created_at=at,
        api_key_id=None,
        feature=feature,
        user_id=user,
        endpoint="/v1/chat/completions",
        model=model,
        upstream_model=model,
        stream=rng.random() < 0.5,
        status_code=rng.choice((429, 502, 504)) if failed else 200,
        attempts=3 if failed else 1,
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        cached_tokens=cached,
        reasoning_tokens=0,
        usage_source="upstream",
        cost_units=usd_to_cost(cost),
        latency_ms=latency,
        ttfb_ms=latency // 3,
        error_type="rate_limit_exceeded" if failed else None,
    )


def write(url: str | None, seeded: list[UsageEvent], data_dir: Path = Path("unused-for-postgres")) -> None:
    async def run() -> None:
        engine = create_engine(url, data_dir)
        try:
            for start in range(0, len(seeded), 1000):
                await write_batch(engine, Batch.of(seeded[start : start + 1000]))
        finally:
            await engine.dispose()

    asyncio.run(run())


@contextmanager
def seeded_database(prefix: str, now: datetime) -> Iterator[tuple[str, str, list[UsageEvent]]]:
    """(name, URL, events) of a new migrated database holding `events(now)`."""
    name, url = create_database(prefix)
    try:
        seeded = events(now)
        write(url, seeded)
        yield name, url, seeded
    finally:
        drop_database(name)
