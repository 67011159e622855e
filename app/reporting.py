"""Usage reports grouped by day, feature, user and model: one query over the `usage_daily` rollup, shared
by GET /v1/usage and `llm-gateway usage`.

Reports are per UTC day, from the rollup rather than the events, so a month's report over a table of
100 million events reads thousands of rows, not millions.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.models import usage_daily

GROUPS: dict[str, ColumnElement[Any]] = {
    "day": usage_daily.c.day,
    "feature": usage_daily.c.feature,
    "user": usage_daily.c.user_id,
    "model": usage_daily.c.model,
}
SUMS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd")


@dataclass(frozen=True, slots=True)
class UsageQuery:
    start: date
    end: date  # exclusive
    group_by: tuple[str, ...] = ("day",)
    filters: dict[str, str] = field(default_factory=dict)
    # The costliest groups only (the dashboard's top users, models and features); None for every group.
    limit: int | None = None


def parse_since(value: str, today: date | None = None) -> date:
    """`7d`, `4w`, `3m` (30-day months) or an ISO date; `7d` means today and the six days before."""
    today = today or datetime.now(UTC).date()
    match = re.fullmatch(r"(\d{1,4})([dwm])", value.strip())
    if match:
        days = int(match[1]) * {"d": 1, "w": 7, "m": 30}[match[2]]
        return today - timedelta(days=max(days - 1, 0))
    return date.fromisoformat(value)


def parse_group_by(value: str | None) -> tuple[str, ...]:
    names = tuple(part.strip() for part in (value or "day").split(",") if part.strip())
    unknown = [name for name in names if name not in GROUPS]
    if unknown or not names:
        raise ValueError(f"group_by takes any of {', '.join(GROUPS)}; got {value!r}")
    return tuple(dict.fromkeys(names))


async def usage_report(engine: AsyncEngine, query: UsageQuery) -> list[dict[str, Any]]:
    groups = [GROUPS[name].label(name) for name in query.group_by]
    sums = [func.coalesce(func.sum(usage_daily.c[name]), 0).label(name) for name in SUMS]
    statement = (
        select(*groups, *sums)
        .where(usage_daily.c.day >= query.start, usage_daily.c.day < query.end)
        .group_by(*[GROUPS[name] for name in query.group_by])
    )
    for name, value in query.filters.items():
        # '' is how the rollup stores "not attributed"; filtering on "" finds those rows.
        statement = statement.where(GROUPS[name] == value)
    order = [GROUPS[name] for name in query.group_by if name == "day"]
    # The group itself breaks ties, so a top-N cut is the same on every call.
    statement = statement.order_by(
        *order, func.sum(usage_daily.c.cost_usd).desc(), *[GROUPS[name] for name in query.group_by]
    )
    if query.limit is not None:
        statement = statement.limit(query.limit)
    async with engine.connect() as conn:
        rows = (await conn.execute(statement)).mappings().all()
    return [_row(dict(row), query.group_by) for row in rows]


def _row(row: dict[str, Any], group_by: tuple[str, ...]) -> dict[str, Any]:
    for name in group_by:
        if name == "day":
            value = row["day"]
            row["day"] = value.isoformat() if isinstance(value, date) else str(value)
        elif row[name] == "":
            row[name] = None
    for name in SUMS[:-1]:
        row[name] = int(row[name])
    row["cost_usd"] = Decimal(row["cost_usd"]).quantize(Decimal("1e-10"))
    return row


# OWASP, "CSV Injection": a spreadsheet takes a cell starting with one of these for a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: object) -> object:
    """A cell as written to CSV. Strings come from clients (feature, user, model): one a spreadsheet would
    run as a formula gets a leading `'`, as OWASP advises, so it reads as the text it is. The numbers are
    the gateway's own."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def to_csv(rows: list[dict[str, Any]], group_by: tuple[str, ...], sums: tuple[str, ...] = SUMS) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*group_by, *sums])
    for row in rows:
        writer.writerow([_csv_cell(row[name]) for name in (*group_by, *sums)])
    return out.getvalue()


def to_table(rows: list[dict[str, Any]], group_by: tuple[str, ...]) -> str:
    """The usage report as a plain-text table for the CLI."""
    return to_plain_table(rows, (*group_by, *SUMS), numeric=frozenset(SUMS))


def to_plain_table(
    rows: list[dict[str, Any]], columns: tuple[str, ...], numeric: frozenset[str] = frozenset()
) -> str:
    cells = [[("-" if row[name] is None else str(row[name])) for name in columns] for row in rows]
    widths = [max([len(name), *(len(line[i]) for line in cells)]) for i, name in enumerate(columns)]
    lines = ["  ".join(name.ljust(w) for name, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for line in cells:
        lines.append(
            "  ".join(
                value.rjust(w) if name in numeric else value.ljust(w)
                for name, value, w in zip(columns, line, widths, strict=True)
            )
        )
    return "\n".join(lines)
