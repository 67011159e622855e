"""The cost dashboard's data: one bounded set of queries for GET /v1/usage/summary.

Cost and tokens come from the `usage_daily` rollup through `usage_report`, the query behind GET /v1/usage,
so the page's totals are that endpoint's to the cent. Errors and latency are not in the rollup: they come
from `usage_events`, over at most the last EVENT_WINDOW_DAYS of the range, through the `(created_at)` and
`(feature, created_at)` indexes, under a statement timeout on Postgres. Every list is a top-N and the
route caps the range, so a dashboard left open on a wall cannot weigh on the database the recorder writes
to.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, case, func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.db.models import usage_events
from app.reporting import UsageQuery, usage_report

MAX_RANGE_DAYS = 92
EVENT_WINDOW_DAYS = 7
TOP_FEATURES = 8
TOP_USERS = 10
TOP_MODELS = 12
TOP_RELIABILITY = 20
STATEMENT_TIMEOUT_MS = 15_000

# The filters' column in the events (the rollup's names are those of GET /v1/usage).
_EVENT_COLUMNS = {
    "feature": usage_events.c.feature,
    "user": usage_events.c.user_id,
    "model": usage_events.c.model,
}


def _money(value: Decimal) -> str:
    return format(value, "f")


def _sums(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "cost_usd": _money(row["cost_usd"])}


async def usage_summary(engine: AsyncEngine, query: UsageQuery) -> dict[str, Any]:
    """Totals, cost per feature per day (the costliest features, the rest as one `other`), top users,
    models, and error rate and p95 latency per feature, for `query`'s days and filters."""
    totals = await usage_report(engine, replace(query, group_by=()))
    by_day = await usage_report(engine, replace(query, group_by=("day",)))
    features = await usage_report(engine, replace(query, group_by=("feature",), limit=TOP_FEATURES + 1))
    # Eight features and `other`, unless a ninth would be the whole of `other`.
    named = [row["feature"] for row in features[: TOP_FEATURES if len(features) > TOP_FEATURES else None]]
    stacked: dict[str, dict[str | None, Decimal]] = {row["day"]: {} for row in by_day}
    for feature in named:
        only = {**query.filters, "feature": feature or ""}
        for row in await usage_report(engine, replace(query, group_by=("day",), filters=only)):
            stacked[row["day"]][feature] = row["cost_usd"]
    users = await usage_report(engine, replace(query, group_by=("user",), limit=TOP_USERS))
    models = await usage_report(engine, replace(query, group_by=("model",), limit=TOP_MODELS))
    window_start = max(query.start, query.end - timedelta(days=EVENT_WINDOW_DAYS))
    return {
        "object": "usage.summary",
        "start": query.start.isoformat(),
        "end": query.end.isoformat(),
        "filters": query.filters,
        "totals": _sums(totals[0]),
        "features": named,
        "other_features": len(features) > TOP_FEATURES,
        "days": [
            {
                "day": row["day"],
                "requests": row["requests"],
                "cost_usd": _money(row["cost_usd"]),
                "by_feature": [_money(stacked[row["day"]].get(name, Decimal(0))) for name in named],
                "other_usd": _money(row["cost_usd"] - sum(stacked[row["day"]].values(), Decimal(0))),
            }
            for row in by_day
        ],
        "top_users": [_sums(row) for row in users],
        "models": [_sums(row) for row in models],
        "reliability": await _reliability(engine, window_start, query.end, query.filters),
    }


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(), tzinfo=UTC)


async def _reliability(
    engine: AsyncEngine, start: date, end: date, filters: dict[str, str]
) -> dict[str, Any]:
    """Requests and failures in all, and requests, failures and p95 latency of the busiest features. The
    p95 is the nearest-rank one (a real call's latency, as Postgres' percentile_disc gives it), computed
    with window functions so that SQLite, which has no percentile aggregate, answers the same."""
    conditions = [usage_events.c.created_at >= _midnight(start), usage_events.c.created_at < _midnight(end)]
    for name, value in filters.items():
        # '' is the rollup's "not attributed"; in the events that is NULL.
        column = _EVENT_COLUMNS[name]
        conditions.append(column.is_(None) if value == "" else column == value)
    failed = case(
        (
            (usage_events.c.status_code >= 400) | usage_events.c.error_type.is_not(None),
            1,
        ),
        else_=0,
    )
    ranked = (
        select(
            usage_events.c.feature,
            usage_events.c.latency_ms,
            failed.label("failed"),
            func.row_number()
            .over(partition_by=usage_events.c.feature, order_by=usage_events.c.latency_ms)
            .label("rank"),
            func.count().over(partition_by=usage_events.c.feature).label("n"),
        )
        .where(and_(*conditions))
        .subquery()
    )
    requests = func.max(ranked.c.n)
    failed_sum = func.sum(ranked.c.failed)
    statement = (
        select(
            ranked.c.feature,
            requests.label("requests"),
            failed_sum.label("failed"),
            func.min(case((ranked.c.rank >= ranked.c.n * 0.95, ranked.c.latency_ms))).label("p95_latency_ms"),
            # Over every feature, not only the listed ones: windows are computed before the LIMIT.
            func.sum(requests).over().label("all_requests"),
            func.sum(failed_sum).over().label("all_failed"),
        )
        .group_by(ranked.c.feature)
        .order_by(requests.desc(), ranked.c.feature)
        .limit(TOP_RELIABILITY)
    )
    async with engine.connect() as conn:
        await _bounded(conn)
        rows = (await conn.execute(statement)).mappings().all()
    return {
        "start": start.isoformat(),
        "end": end.isoformat(),
        "requests": int(rows[0]["all_requests"]) if rows else 0,
        "failed": int(rows[0]["all_failed"]) if rows else 0,
        "features": [
            {
                "feature": row["feature"],
                "requests": int(row["requests"]),
                "failed": int(row["failed"]),
                "p95_latency_ms": int(row["p95_latency_ms"]),
            }
            for row in rows
        ],
    }


async def _bounded(conn: AsyncConnection) -> None:
    if conn.dialect.name == "postgresql":
        await conn.execute(text(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}"))
