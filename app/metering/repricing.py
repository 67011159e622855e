"""What the price table says about rows already written: the models seen without a price, and re-pricing
the rows whose price entry has changed since they were priced (`llm-gateway prices unpriced`, `reprice`).

A row is priced by the model that answered (`upstream_model`, else `model`) at the tier it records, and
names the entry that priced it and that entry's version (`price_key`, `price_version`; both NULL when
unpriced). A row needs re-pricing exactly when the table would now price it by another entry or version:
typically a model that had no price, or an operator's entry whose rates changed. Re-pricing updates those
rows and adds the difference to `usage_daily` in one transaction, so running it twice changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any

from sqlalchemy import BigInteger, and_, bindparam, cast, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from app.db.events import cost_to_usd, usd_to_cost
from app.db.models import usage_daily, usage_events
from app.metering.pricing import PriceTable, family_of, rate_tier

# Rows read and updated at a time.
_PAGE = 5000
_PRICED_MODEL = func.coalesce(usage_events.c.upstream_model, usage_events.c.model)
_TOKENS = (
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "audio_prompt_tokens",
    "audio_completion_tokens",
    "image_prompt_tokens",
    "image_completion_tokens",
)


def _start(since: date) -> datetime:
    return datetime.combine(since, time(), tzinfo=UTC)


async def unpriced(engine: AsyncEngine, since: date) -> list[dict[str, Any]]:
    """Models seen since `since` whose calls have no price, with their calls and tokens, most calls first."""
    priced_model = _PRICED_MODEL.label("model")
    statement = (
        select(
            priced_model,
            usage_events.c.service_tier.label("service_tier"),
            func.count().label("calls"),
            cast(func.sum(usage_events.c.prompt_tokens), BigInteger).label("prompt_tokens"),
            cast(func.sum(usage_events.c.completion_tokens), BigInteger).label("completion_tokens"),
            cast(func.sum(usage_events.c.total_tokens), BigInteger).label("total_tokens"),
            func.max(usage_events.c.created_at).label("last_seen"),
        )
        .where(
            usage_events.c.created_at >= _start(since),
            usage_events.c.cost_usd.is_(None),
            _PRICED_MODEL.is_not(None),
        )
        .group_by(_PRICED_MODEL, usage_events.c.service_tier)
        .order_by(func.count().desc(), _PRICED_MODEL)
    )
    async with engine.connect() as conn:
        result = await conn.execute(statement)
        # Plain str keys: the column names SQLAlchemy hands back are a str subclass.
        names = list(map(str, result.keys()))
        return [dict(zip(names, row, strict=True)) for row in result]


@dataclass
class DayDelta:
    """The change re-pricing makes to one day's cost of one model (usage_daily's `model`)."""

    day: date
    model: str
    rows: int = 0
    old_cost: Decimal = Decimal(0)
    new_cost: Decimal = Decimal(0)

    @property
    def delta(self) -> Decimal:
        return self.new_cost - self.old_cost

    def as_row(self) -> dict[str, Any]:
        return {
            "day": self.day,
            "model": self.model,
            "rows": self.rows,
            "old_cost_usd": self.old_cost,
            "new_cost_usd": self.new_cost,
            "delta_usd": self.delta,
        }


@dataclass(frozen=True)
class _Group:
    model: str | None
    priced_model: str | None
    service_tier: str | None
    price_key: str | None
    price_version: str | None

    def where(self) -> ColumnElement[bool]:
        return and_(
            usage_events.c.model.is_not_distinct_from(self.model),
            _PRICED_MODEL.is_not_distinct_from(self.priced_model),
            usage_events.c.service_tier.is_not_distinct_from(self.service_tier),
            usage_events.c.price_key.is_not_distinct_from(self.price_key),
            usage_events.c.price_version.is_not_distinct_from(self.price_version),
        )


def _matches(group: _Group, model: str | None) -> bool:
    if model is None:
        return True
    wanted = family_of(model)
    return any(name is not None and family_of(name) == wanted for name in (group.model, group.priced_model))


async def reprice(
    engine: AsyncEngine, prices: PriceTable, since: date, *, model: str | None = None, dry_run: bool = False
) -> list[DayDelta]:
    """Re-price the rows since `since` (of `model`, or its snapshots, when given) whose price entry is not
    the one the table would use now; with `dry_run` nothing is written. Returns the change per day and
    model."""
    async with engine.connect() as conn, conn.begin() as transaction:
        deltas = await _reprice(conn, prices, since, model, write=not dry_run)
        if dry_run:
            await transaction.rollback()
    return sorted(deltas.values(), key=lambda d: (d.day, d.model))


async def _reprice(
    conn: AsyncConnection, prices: PriceTable, since: date, model: str | None, *, write: bool
) -> dict[tuple[date, str], DayDelta]:
    start = _start(since)
    groups = [
        _Group(*row)
        for row in await conn.execute(
            select(
                usage_events.c.model,
                _PRICED_MODEL,
                usage_events.c.service_tier,
                usage_events.c.price_key,
                usage_events.c.price_version,
            )
            .where(usage_events.c.created_at >= start)
            .distinct()
        )
    ]
    deltas: dict[tuple[date, str], DayDelta] = {}
    daily: dict[tuple[date, str, str, str], int] = {}
    for group in groups:
        if not _matches(group, model):
            continue
        tier = rate_tier(group.service_tier)
        stored = None if group.price_key is None else (group.price_key, group.price_version)
        if prices.lookup(group.priced_model, tier) == stored:
            continue
        last_id = -1
        while True:
            # Keyset pages: memory stays bounded however many rows the group has. The rows stay locked
            # to the end of the transaction: two re-pricings at once wait for each other instead of both
            # adding the same difference.
            rows = (
                await conn.execute(
                    select(
                        usage_events.c.id,
                        usage_events.c.created_at,
                        usage_events.c.feature,
                        usage_events.c.user_id,
                        usage_events.c.cost_usd,
                        *(usage_events.c[name] for name in _TOKENS),
                    )
                    .where(usage_events.c.created_at >= start, usage_events.c.id > last_id, group.where())
                    .order_by(usage_events.c.id)
                    .limit(_PAGE)
                    .with_for_update()
                )
            ).all()
            if not rows:
                break
            last_id = rows[-1].id
            updates: list[dict[str, Any]] = []
            for row in rows:
                priced = prices.price(group.priced_model, tier, *row[5:])
                old_units = usd_to_cost(row.cost_usd) or 0
                day = row.created_at.astimezone(UTC).date()
                key = (day, group.model or "")
                entry = deltas.get(key) or deltas.setdefault(key, DayDelta(day, group.model or ""))
                entry.rows += 1
                entry.old_cost += cost_to_usd(old_units) or 0
                entry.new_cost += cost_to_usd(priced.cost_units or 0) or 0
                rollup = (day, row.feature or "", row.user_id or "", group.model or "")
                daily[rollup] = daily.get(rollup, 0) + (priced.cost_units or 0) - old_units
                updates.append(
                    {
                        "row_id": row.id,
                        "new_cost": cost_to_usd(priced.cost_units),
                        "new_key": priced.price_key,
                        "new_version": priced.price_version,
                    }
                )
            if write:
                await _update_rows(conn, updates)
    if write:
        await _update_daily(conn, [(key, units) for key, units in sorted(daily.items()) if units])
    return deltas


async def _update_rows(conn: AsyncConnection, updates: list[dict[str, Any]]) -> None:
    statement = (
        update(usage_events)
        .where(usage_events.c.id == bindparam("row_id"))
        .values(
            cost_usd=bindparam("new_cost"),
            price_key=bindparam("new_key"),
            price_version=bindparam("new_version"),
        )
    )
    await conn.execute(statement, updates)


async def _update_daily(
    conn: AsyncConnection, changes: Sequence[tuple[tuple[date, str, str, str], int]]
) -> None:
    for (day, feature, user_id, model), units in changes:
        await conn.execute(
            update(usage_daily)
            .where(
                usage_daily.c.day == day,
                usage_daily.c.feature == feature,
                usage_daily.c.user_id == user_id,
                usage_daily.c.model == model,
            )
            .values(cost_usd=usage_daily.c.cost_usd + cost_to_usd(units))
        )
