"""OpenAI's numbers into provider_usage_daily, and the reconciliation_daily view out.

A run replaces the days it read, in one transaction: reading a day again (OpenAI revises recent days)
never counts it twice, and a run that fails part-way leaves the previous numbers as they were.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import delete, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.models import provider_usage_daily, provider_usage_days
from app.reconcile.provider import ProviderRow
from app.reporting import to_plain_table

# reconciliation_daily's columns, in the order reports print them.
COUNTS = (
    "gateway_requests",
    "openai_requests",
    "requests_difference",
    "gateway_input_tokens",
    "openai_input_tokens",
    "input_tokens_difference",
    "gateway_cached_tokens",
    "openai_cached_tokens",
    "gateway_output_tokens",
    "openai_output_tokens",
    "output_tokens_difference",
    "gateway_unpriced_requests",
)
MONEY = ("gateway_cost_usd", "openai_cost_usd", "cost_difference_usd")
COLUMNS = ("day", "model", *COUNTS, *MONEY, "cost_relative_difference")
_QUANTUM = Decimal("1e-10")


async def replace_days(
    engine: AsyncEngine, start: date, end: date, rows: Sequence[ProviderRow], fetched_at: datetime
) -> None:
    """Store OpenAI's numbers for the UTC days [start, end), replacing what was stored for them."""
    days = [start + timedelta(days=n) for n in range((end - start).days)]
    async with engine.begin() as conn:
        for table in (provider_usage_daily, provider_usage_days):
            await conn.execute(delete(table).where(table.c.day >= start, table.c.day < end))
        if rows:
            await conn.execute(
                insert(provider_usage_daily), [asdict(row) | {"fetched_at": fetched_at} for row in rows]
            )
        await conn.execute(
            insert(provider_usage_days),
            [{"day": day, "fetched_at": fetched_at, "complete": _day_end(day) <= fetched_at} for day in days],
        )


async def last_fetch(engine: AsyncEngine) -> datetime | None:
    async with engine.connect() as conn:
        value = await conn.scalar(select(func.max(provider_usage_days.c.fetched_at)))
    return value if isinstance(value, datetime) else None


async def report(engine: AsyncEngine, start: date, end: date) -> list[dict[str, Any]]:
    """reconciliation_daily for the UTC days [start, end), by day then model."""
    statement = text(
        f"SELECT {', '.join(COLUMNS)} FROM reconciliation_daily"
        " WHERE day >= :start AND day < :end ORDER BY day, model"
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(statement, {"start": start, "end": end})).mappings().all()
    return [_typed(dict(row)) for row in rows]


async def latest_complete_day(engine: AsyncEngine) -> dict[str, Any] | None:
    """The totals of the last day that had ended when OpenAI's numbers for it were read."""
    async with engine.connect() as conn:
        day = await conn.scalar(
            select(func.max(provider_usage_days.c.day)).where(provider_usage_days.c.complete.is_(True))
        )
    if day is None:
        return None
    day = day if isinstance(day, date) else date.fromisoformat(str(day))
    rows = await report(engine, day, day + timedelta(days=1))
    totals: dict[str, Any] = {"day": day}
    for name in (*COUNTS, *MONEY):
        totals[name] = sum((row[name] for row in rows), start=Decimal(0) if name in MONEY else 0)
    return totals


def relative(openai: float, gateway: float) -> float:
    """(OpenAI - gateway) / OpenAI; ±inf when OpenAI reports nothing the gateway saw."""
    if openai:
        return (openai - gateway) / openai
    return 0.0 if not gateway else float("-inf")


# What the CLI's table shows; CSV and JSON have every column.
_TABLE = (
    "day",
    "model",
    "gateway_requests",
    "openai_requests",
    "requests_difference",
    "gateway_input_tokens",
    "openai_input_tokens",
    "gateway_output_tokens",
    "openai_output_tokens",
    "gateway_cost_usd",
    "openai_cost_usd",
    "cost_difference_usd",
    "cost_relative_difference",
)
_SHOWN = Decimal("1e-6")


def to_table(rows: list[dict[str, Any]]) -> str:
    """Per day and model, then the day's total."""
    lines: list[dict[str, Any]] = []
    for index, row in enumerate(rows):
        lines.append(_shown(row))
        if index + 1 == len(rows) or rows[index + 1]["day"] != row["day"]:
            day_rows = [r for r in rows if r["day"] == row["day"]]
            total: dict[str, Any] = {"day": row["day"], "model": "(day total)"}
            for name in (*COUNTS, *MONEY):
                total[name] = sum(r[name] for r in day_rows)
            openai, gateway = total["openai_cost_usd"], total["gateway_cost_usd"]
            total["cost_relative_difference"] = (openai - gateway) / openai if openai else None
            lines.append(_shown(total))
    return to_plain_table(lines, _TABLE, numeric=frozenset(_TABLE[2:]))


def _shown(row: dict[str, Any]) -> dict[str, Any]:
    shown = dict(row)
    for name in MONEY:
        shown[name] = row[name].quantize(_SHOWN)
    ratio = row["cost_relative_difference"]
    shown["cost_relative_difference"] = None if ratio is None else f"{float(ratio):+.2%}"
    return shown


def _typed(row: dict[str, Any]) -> dict[str, Any]:
    # SQLite hands the view's dates and sums back as text and floats.
    day = row["day"]
    row["day"] = day if isinstance(day, date) else date.fromisoformat(str(day))
    for name in COUNTS:
        row[name] = int(row[name] or 0)
    for name in MONEY:
        row[name] = Decimal(str(row[name] or 0)).quantize(_QUANTUM)
    ratio = row["cost_relative_difference"]
    row["cost_relative_difference"] = None if ratio is None else float(ratio)
    return row


def _day_end(day: date) -> datetime:
    return datetime.combine(day + timedelta(days=1), time(), tzinfo=UTC)
