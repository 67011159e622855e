"""GET /v1/usage: tokens and cost per day, feature, user and model, as JSON or CSV; GET /v1/usage/summary:
the cost dashboard's data. Both for the master key or a key with the `reports` scope."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Annotated, Literal

import orjson
from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy.exc import SQLAlchemyError
from starlette.responses import Response

from app.errors import GatewayError, bad_request
from app.reports.dashboard import MAX_RANGE_DAYS, usage_summary
from app.reports.usage import UsageQuery, default_range, parse_group_by, to_csv, usage_report
from app.routes.deps import ReportsDep
from app.services import services_of

router = APIRouter()

# Two summaries at a time per process: each is a dozen queries, and a page reloaded in a loop (or many
# open at once) must queue in the browser, not in the database's connection pool.
SUMMARIES_IN_FLIGHT = 2

Filter = Annotated[str | None, Query(max_length=256)]


def _day(value: str | None, param: str, default: date) -> date:
    if value is None:
        return default
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        raise bad_request(f"'{param}' must be a date (YYYY-MM-DD).", param=param) from None


@dataclass(frozen=True, slots=True)
class ReportRange:
    start: date
    end: date  # exclusive
    filters: dict[str, str]


def report_range(
    start: Annotated[
        str | None, Query(max_length=32, description="first UTC day, inclusive (default: 1st of this month)")
    ] = None,
    end: Annotated[
        str | None, Query(max_length=32, description="last UTC day, exclusive (default: tomorrow)")
    ] = None,
    feature: Filter = None,
    user: Filter = None,
    model: Filter = None,
) -> ReportRange:
    first, tomorrow = default_range()
    query_start = _day(start, "start", first)
    query_end = _day(end, "end", tomorrow)
    if query_end <= query_start:
        raise bad_request("'end' must be after 'start'.", param="end")
    filters = {
        name: value for name, value in (("feature", feature), ("user", user), ("model", model)) if value
    }
    return ReportRange(query_start, query_end, filters)


RangeDep = Annotated[ReportRange, Depends(report_range)]


@router.get("/v1/usage")
async def usage(
    request: Request,
    _: ReportsDep,
    span: RangeDep,
    group_by: Annotated[
        str | None, Query(max_length=64, description="comma-separated: day, feature, user, model")
    ] = None,
    format: Literal["json", "csv"] = "json",
) -> Response:
    try:
        groups = parse_group_by(group_by)
    except ValueError as exc:
        raise bad_request(str(exc), param="group_by") from None
    try:
        rows = await usage_report(
            services_of(request).engine, UsageQuery(span.start, span.end, groups, span.filters)
        )
    except SQLAlchemyError:
        raise _unavailable("The usage report") from None
    if format == "csv":
        return Response(to_csv(rows, groups), media_type="text/csv")
    body = {
        "object": "list",
        "start": span.start.isoformat(),
        "end": span.end.isoformat(),
        "group_by": list(groups),
        "data": rows,
    }
    return Response(orjson.dumps(body), media_type="application/json")


@router.get("/v1/usage/summary")
async def usage_summary_route(request: Request, _: ReportsDep, span: RangeDep) -> Response:
    if (span.end - span.start).days > MAX_RANGE_DAYS:
        raise bad_request(
            f"A summary covers at most {MAX_RANGE_DAYS} days; narrow 'start'..'end'.", param="end"
        )
    state = services_of(request)
    if state.summaries_in_flight >= SUMMARIES_IN_FLIGHT:
        raise GatewayError(
            429,
            "Too many usage summaries are being computed; try again in a moment.",
            code="reports_busy",
            headers={"retry-after": "1"},
        )
    state.summaries_in_flight += 1
    try:
        body = await usage_summary(state.engine, UsageQuery(span.start, span.end, filters=span.filters))
    except SQLAlchemyError:
        raise _unavailable("The usage summary") from None
    finally:
        state.summaries_in_flight -= 1
    return Response(orjson.dumps(body), media_type="application/json")


def _unavailable(what: str) -> GatewayError:
    """The database is unreachable, or a query ran past its statement timeout: a 503 the client may
    retry, never a 500."""
    return GatewayError(
        503,
        f"{what} could not be computed right now; try again, or a shorter range or a filter.",
        code="reports_unavailable",
    )
