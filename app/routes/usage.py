"""GET /v1/usage: tokens and cost per day, feature, user and model, as JSON or CSV (master key only)."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

import orjson
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from app.deps import MasterDep
from app.errors import bad_request
from app.reporting import UsageQuery, default_range, parse_group_by, to_csv, usage_report

router = APIRouter()


def _day(value: str | None, param: str, default: date) -> date:
    if value is None:
        return default
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        raise bad_request(f"'{param}' must be a date (YYYY-MM-DD).", param=param) from None


@router.get("/v1/usage")
async def usage(
    request: Request,
    _: MasterDep,
    start: Annotated[
        str | None, Query(description="first UTC day, inclusive (default: 1st of this month)")
    ] = None,
    end: Annotated[str | None, Query(description="last UTC day, exclusive (default: tomorrow)")] = None,
    group_by: Annotated[str | None, Query(description="comma-separated: day, feature, user, model")] = None,
    feature: str | None = None,
    user: str | None = None,
    model: str | None = None,
    format: Literal["json", "csv"] = "json",
) -> Response:
    first, tomorrow = default_range()
    query_start = _day(start, "start", first)
    query_end = _day(end, "end", tomorrow)
    if query_end <= query_start:
        raise bad_request("'end' must be after 'start'.", param="end")
    try:
        groups = parse_group_by(group_by)
    except ValueError as exc:
        raise bad_request(str(exc), param="group_by") from None
    filters = {
        name: value for name, value in (("feature", feature), ("user", user), ("model", model)) if value
    }
    rows = await usage_report(request.app.state.engine, UsageQuery(query_start, query_end, groups, filters))
    if format == "csv":
        return Response(to_csv(rows, groups), media_type="text/csv")
    body = {
        "object": "list",
        "start": query_start.isoformat(),
        "end": query_end.isoformat(),
        "group_by": list(groups),
        "data": rows,
    }
    return Response(orjson.dumps(body), media_type="application/json")
