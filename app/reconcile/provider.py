"""Reading OpenAI's own numbers: the organization Usage API (completions and embeddings, requests and tokens
per model and day) and the Costs API (USD per line item and day).

The admin key goes only to these endpoints, under the configured upstream's base URL, through the one
upstream client (retries, deadlines, no redirects, bounded answers). Everything read is bounded: the days
asked for, the pages followed, the bytes of a page and each string kept; a page outside those bounds
fails the run rather than being stored in part.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Literal, TypeVar
from urllib.parse import urlencode

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.call.record import CallRecord
from app.proxy.targets import UpstreamTarget
from app.proxy.upstream import UpstreamClient, UpstreamUnavailable, never_open

USAGE_SOURCES = ("completions", "embeddings")
MAX_DAYS = 366
# OpenAI's largest page of daily buckets for the Usage API (the Costs API takes up to 180).
PAGE_DAYS = 31
# A run follows at most this many pages per endpoint: a year at 31 days a page, with room for OpenAI
# splitting a page by its results.
MAX_PAGES = 64
MAX_PAGE_BYTES = 4 * 1024 * 1024
_COST_QUANTUM = Decimal("1e-10")
# Counts beyond this are not a day of one organization's usage; they would not fit the bigint columns
# once summed.
_MAX_COUNT = 10**15
_MAX_UNIX = 10**11
# Costs line items name the model, then a modality for some ("… audio, input"), then what was charged.
_MODALITY = re.compile(r" (audio|text|image)$")
_KEY_LIKE = re.compile(r"sk-[A-Za-z0-9*_-]+")


class ProviderError(Exception):
    """OpenAI's numbers could not be read; the message is one line for the operator, without the key."""


@dataclass(slots=True)
class ProviderRow:
    day: date
    source: str
    model: str
    line_item: str = ""
    requests: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    cost_usd: Decimal = field(default_factory=Decimal)


class _OpenAIObject(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _Bucket(_OpenAIObject):
    object: Literal["bucket"]
    start_time: int = Field(ge=0, le=_MAX_UNIX)
    end_time: int = Field(ge=0, le=_MAX_UNIX)
    results: list[dict[str, Any]] = Field(max_length=100_000)


class _Page(_OpenAIObject):
    object: Literal["page"]
    data: list[_Bucket] = Field(max_length=10_000)
    has_more: bool
    next_page: str | None = Field(default=None, max_length=4096)


class _UsageResult(_OpenAIObject):
    input_tokens: int = Field(ge=0, le=_MAX_COUNT)
    output_tokens: int = Field(default=0, ge=0, le=_MAX_COUNT)  # embeddings have none
    input_cached_tokens: int | None = Field(default=None, ge=0, le=_MAX_COUNT)
    num_model_requests: int = Field(ge=0, le=_MAX_COUNT)
    model: str | None = Field(default=None, max_length=256)


class _Amount(_OpenAIObject):
    value: Decimal = Field(allow_inf_nan=False, ge=-(10**9), le=10**9)
    currency: str = Field(max_length=16)


class _CostResult(_OpenAIObject):
    amount: _Amount | None = None
    line_item: str | None = Field(default=None, max_length=512)


_Result = TypeVar("_Result", _UsageResult, _CostResult)


def line_item_model(line_item: str | None) -> str:
    """'gpt-4o-mini-2024-07-18, cached input' -> 'gpt-4o-mini-2024-07-18', the name the Usage API and the
    gateway's upstream_model use. A line item that names no model ('web search tool calls', 'evals | …')
    stays whole: it is reported beside the models, not folded into one."""
    if not line_item:
        return ""
    head, comma, _ = line_item.rpartition(", ")
    return _MODALITY.sub("", head) if comma else line_item


@dataclass(frozen=True, slots=True)
class Filters:
    project_ids: tuple[str, ...] = ()
    api_key_ids: tuple[str, ...] = ()

    @classmethod
    def parse(cls, project_ids: str, api_key_ids: str) -> Filters:
        return cls(tuple(filter(None, project_ids.split(","))), tuple(filter(None, api_key_ids.split(","))))


class OrganizationReader:
    def __init__(
        self, upstream: UpstreamClient, base_url: str, admin_key: str, filters: Filters = Filters()
    ) -> None:
        self._upstream = upstream
        # Its own target: the admin key never rides on a model call, nor the model key on these.
        self._target = UpstreamTarget("openai-organization", base_url, admin_key)
        self._filters = filters

    async def read(self, start: date, end: date) -> list[ProviderRow]:
        """Usage and costs for the UTC days [start, end), summed per (day, source, model, line item)."""
        days = (end - start).days
        if not 0 < days <= MAX_DAYS:
            raise ProviderError(f"reconciliation reads 1 to {MAX_DAYS} days; asked for {days}")
        rows: dict[tuple[date, str, str, str], ProviderRow] = {}
        for source in USAGE_SOURCES:
            async for day, result in self._results(f"/organization/usage/{source}", start, end, "model"):
                usage = _parse(_UsageResult, result, source)
                model = usage.model or ""
                row = rows.setdefault((day, source, model, ""), ProviderRow(day, source, model))
                row.requests += usage.num_model_requests
                row.input_tokens += usage.input_tokens
                row.cached_tokens += usage.input_cached_tokens or 0
                row.output_tokens += usage.output_tokens
        async for day, result in self._results("/organization/costs", start, end, "line_item"):
            cost = _parse(_CostResult, result, "costs")
            if cost.amount is None:
                continue
            if cost.amount.currency.lower() != "usd":
                raise ProviderError(f"OpenAI's costs came in {cost.amount.currency!r}; only usd is compared")
            line_item = cost.line_item or ""
            key = (day, "costs", line_item_model(line_item), line_item)
            row = rows.setdefault(key, ProviderRow(day, "costs", key[2], line_item))
            row.cost_usd += cost.amount.value
        for row in rows.values():
            row.cost_usd = row.cost_usd.quantize(_COST_QUANTUM)
        return list(rows.values())

    async def _results(
        self, endpoint: str, start: date, end: date, group_by: str
    ) -> AsyncIterator[tuple[date, dict[str, Any]]]:
        async for page in self._pages(endpoint, start, end, group_by):
            for bucket in page.data:
                day = datetime.fromtimestamp(bucket.start_time, UTC).date()
                if not start <= day < end or bucket.end_time - bucket.start_time != 86400:
                    raise ProviderError(f"{endpoint}: a bucket outside the days asked for ({day})")
                for result in bucket.results:
                    yield day, result

    async def _pages(self, endpoint: str, start: date, end: date, group_by: str) -> AsyncIterator[_Page]:
        cursor: str | None = None
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            page = await self._page(endpoint, self._query(start, end, group_by, cursor))
            yield page
            if not page.has_more:
                return
            if not page.next_page or page.next_page in seen:
                raise ProviderError(f"{endpoint}: has_more without a new next_page cursor; stopped")
            cursor = page.next_page
            seen.add(cursor)
        raise ProviderError(f"{endpoint}: more than {MAX_PAGES} pages; stopped")

    def _query(self, start: date, end: date, group_by: str, cursor: str | None) -> str:
        params: list[tuple[str, str | int]] = [
            ("start_time", _unix(start)),
            ("end_time", _unix(end)),
            ("bucket_width", "1d"),
            ("group_by", group_by),
            ("limit", min((end - start).days, PAGE_DAYS)),
        ]
        params += [("project_ids", project) for project in self._filters.project_ids]
        params += [("api_key_ids", key) for key in self._filters.api_key_ids]
        if cursor is not None:
            params.append(("page", cursor))
        return urlencode(params)

    async def _page(self, endpoint: str, query: str) -> _Page:
        call = CallRecord(request_id="reconcile_" + secrets.token_hex(10), method="GET", path=endpoint)
        try:
            answer = await self._upstream.send(
                self._target,
                "GET",
                f"{endpoint}?{query}",
                body=b"",
                headers={"accept": "application/json"},
                call=call,
                keep_open=never_open,
            )
        except UpstreamUnavailable as exc:
            raise ProviderError(f"{endpoint}: {exc}") from None
        if answer.status != 200:
            raise ProviderError(f"{endpoint}: OpenAI answered {answer.status}: {_error_text(answer.body)}")
        if len(answer.body) > MAX_PAGE_BYTES:
            raise ProviderError(f"{endpoint}: a page larger than {MAX_PAGE_BYTES} bytes; stopped")
        try:
            # Off the event loop: in the gateway, a page of several MB would hold up requests meanwhile.
            return await asyncio.to_thread(_Page.model_validate_json, answer.body)
        except ValidationError as exc:
            raise ProviderError(f"{endpoint}: not a page of buckets: {_first_error(exc)}") from None


def _parse(model: type[_Result], result: dict[str, Any], source: str) -> _Result:
    try:
        return model.model_validate(result)
    except ValidationError as exc:
        raise ProviderError(f"{source}: a result OpenAI sent is malformed: {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(map(str, err['loc']))}: {err['msg']}"


def _error_text(body: bytes) -> str:
    """OpenAI's error code and message, with anything like a key (OpenAI's message repeats a masked one)
    removed and the length bounded."""
    try:
        error = orjson.loads(body).get("error") or {}
        text = f"{error.get('code') or error.get('type') or 'error'}: {error.get('message') or ''}"
    except (orjson.JSONDecodeError, AttributeError):
        text = "a body that is not OpenAI's error JSON"
    return _KEY_LIKE.sub("sk-…", text)[:300]


def _unix(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())
