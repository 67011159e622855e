"""The fake's organization Usage and Costs APIs: GET /v1/organization/usage/completions,
/v1/organization/usage/embeddings and /v1/organization/costs, in OpenAI's shapes (a ``page`` of daily
``bucket`` objects, ``has_more`` / ``next_page`` pagination, costs as ``amount: {value, currency}`` per
``line_item``), behind the fake's admin key (``openai_upstream`` checks it).

What they report is what the fake served: every chat completion, response and embedding answered with a
usage is counted on the UTC day it was answered, under the fake's own project and API key
(``GATEWAY_PROJECT`` / ``GATEWAY_API_KEY_ID``), and priced at ``PRICES``. A test plants more with
``plant()`` (traffic that bypassed the gateway, a day in the past, a cost OpenAI billed differently).

Deliberate divergences from OpenAI: only ``bucket_width=1d``; results are grouped by ``model`` (usage) or
``line_item`` (costs) when asked, and by nothing else; ``page_buckets`` caps a page below ``limit`` so a
test can make pagination happen over a few days; a stream answered without its usage chunk is not counted.
"""

from __future__ import annotations

import base64
import binascii
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from tests.fakes import openai_payloads as p
from tests.fakes.answers import Answer, Incoming, Router, error_body, json_body

GATEWAY_PROJECT = "proj_gateway"
GATEWAY_API_KEY_ID = "key_gateway"
DAY_S = 86400
# USD per 1M (input, cached input, output) tokens, as OpenAI lists them.
PRICES = {
    "gpt-4o-mini-2024-07-18": (Decimal("0.15"), Decimal("0.075"), Decimal("0.60")),
    "gpt-4o-2024-08-06": (Decimal("2.50"), Decimal("1.25"), Decimal("10.00")),
    "gpt-4.1-2025-04-14": (Decimal("2.00"), Decimal("0.50"), Decimal("8.00")),
    "text-embedding-3-small": (Decimal("0.02"), Decimal("0"), Decimal("0")),
}
_MAX_LIMIT = {"completions": 31, "embeddings": 31, "costs": 180}
_SOURCES = {
    "/v1/chat/completions": "completions",
    "/v1/responses": "completions",
    "/v1/embeddings": "embeddings",
}


@dataclass
class _Counts:
    requests: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0


class OrganizationAPI:
    def __init__(self, admin_key: str) -> None:
        self.admin_key = admin_key
        self.page_buckets: int | None = None  # at most this many buckets a page, whatever `limit` says
        self.endless_pages = False  # every page says has_more, with the same cursor
        self._lock = threading.Lock()
        # (day, source, model, project, api key) -> counts
        self._usage: dict[tuple[date, str, str, str, str], _Counts] = defaultdict(_Counts)
        # (day, line item, project, api key) -> USD, on top of what the usage costs at PRICES
        self._costs: dict[tuple[date, str, str, str], Decimal] = defaultdict(Decimal)

    def clear(self) -> None:
        with self._lock:
            self._usage.clear()
            self._costs.clear()
        self.page_buckets = None
        self.endless_pages = False

    def served(self, path: str, body: Any, usage: dict[str, Any]) -> None:
        """Count a call the fake answered with this usage."""
        source = _SOURCES.get(path)
        if source is None or not isinstance(body, dict):
            return
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
        self.plant(
            datetime.now(UTC).date(),
            p.snapshot_model(str(body.get("model"))),
            source=source,
            requests=1,
            input_tokens=int(usage.get("prompt_tokens", usage.get("input_tokens", 0))),
            cached_tokens=int(details.get("cached_tokens", 0)),
            output_tokens=int(usage.get("completion_tokens", usage.get("output_tokens", 0))),
        )

    def plant(
        self,
        day: date,
        model: str,
        *,
        source: str = "completions",
        requests: int = 0,
        input_tokens: int = 0,
        cached_tokens: int = 0,
        output_tokens: int = 0,
        project: str = GATEWAY_PROJECT,
        api_key_id: str = GATEWAY_API_KEY_ID,
    ) -> None:
        with self._lock:
            counts = self._usage[(day, source, model, project, api_key_id)]
            counts.requests += requests
            counts.input_tokens += input_tokens
            counts.cached_tokens += cached_tokens
            counts.output_tokens += output_tokens

    def plant_cost(
        self,
        day: date,
        line_item: str,
        usd: Decimal,
        *,
        project: str = GATEWAY_PROJECT,
        api_key_id: str = GATEWAY_API_KEY_ID,
    ) -> None:
        with self._lock:
            self._costs[(day, line_item, project, api_key_id)] += usd

    def register(self, router: Router) -> None:
        router.add("GET", "/v1/organization/usage/completions", self._completions)
        router.add("GET", "/v1/organization/usage/embeddings", self._embeddings)
        router.add("GET", "/v1/organization/costs", self._cost_page)

    async def _completions(self, incoming: Incoming) -> Answer:
        return self._page(incoming, "completions")

    async def _embeddings(self, incoming: Incoming) -> Answer:
        return self._page(incoming, "embeddings")

    async def _cost_page(self, incoming: Incoming) -> Answer:
        return self._page(incoming, "costs")

    def _page(self, incoming: Incoming, source: str) -> Answer:
        query = incoming.request.query
        try:
            start = int(query["start_time"])
            end = int(query.get("end_time", int(time.time())))
            limit = int(query.get("limit", 7))
        except (KeyError, ValueError):
            return error_body(400, "start_time is required and must be an integer", param="start_time")
        if query.get("bucket_width", "1d") != "1d":
            return error_body(400, "this fake serves bucket_width=1d only", param="bucket_width")
        if not 1 <= limit <= _MAX_LIMIT[source]:
            return error_body(400, f"limit must be between 1 and {_MAX_LIMIT[source]}", param="limit")
        first = start
        if "page" in query:
            try:
                first = int(base64.b64decode(query["page"].removeprefix("page_"), validate=True))
            except (binascii.Error, ValueError):
                return error_body(400, "Invalid page cursor", param="page")
        per_page = min(limit, self.page_buckets or limit)
        starts = list(range(first, end, DAY_S))[:per_page]
        following = (starts[-1] + DAY_S) if starts else end
        has_more = following < end or self.endless_pages
        next_start = first if self.endless_pages else following
        group_by = set(query.getall("group_by", [])) | set(query.getall("group_by[]", []))
        projects = set(query.getall("project_ids", [])) | set(query.getall("project_ids[]", []))
        keys = set(query.getall("api_key_ids", [])) | set(query.getall("api_key_ids[]", []))
        buckets = [
            {
                "object": "bucket",
                "start_time": bucket_start,
                "end_time": bucket_start + DAY_S,
                "results": self._results(source, bucket_start, group_by, projects, keys),
            }
            for bucket_start in starts
        ]
        cursor = "page_" + base64.b64encode(str(next_start).encode()).decode() if has_more else None
        return json_body({"object": "page", "data": buckets, "has_more": has_more, "next_page": cursor})

    def _results(
        self, source: str, bucket_start: int, group_by: set[str], projects: set[str], keys: set[str]
    ) -> list[dict[str, Any]]:
        day = datetime.fromtimestamp(bucket_start, UTC).date()

        def wanted(project: str, key: str) -> bool:
            return (not projects or project in projects) and (not keys or key in keys)

        with self._lock:
            usage = [
                (entry, counts)
                for entry, counts in self._usage.items()
                if entry[0] == day and wanted(entry[3], entry[4])
            ]
            planted = [
                (entry, usd) for entry, usd in self._costs.items() if entry[0] == day and wanted(*entry[2:])
            ]
        if source == "costs":
            return _cost_results(usage, planted, "line_item" in group_by)
        by_model: dict[str | None, _Counts] = defaultdict(_Counts)
        for (_, kind, model, _, _), counts in usage:
            if kind == source:
                total = by_model[model if "model" in group_by else None]
                total.requests += counts.requests
                total.input_tokens += counts.input_tokens
                total.cached_tokens += counts.cached_tokens
                total.output_tokens += counts.output_tokens
        return [_usage_result(source, model, counts) for model, counts in by_model.items()]


def _usage_result(source: str, model: str | None, counts: _Counts) -> dict[str, Any]:
    result: dict[str, Any] = {
        "object": f"organization.usage.{source}.result",
        "input_tokens": counts.input_tokens,
    }
    if source == "completions":
        result |= {
            "input_cached_tokens": counts.cached_tokens,
            "input_uncached_tokens": counts.input_tokens - counts.cached_tokens,
            "output_tokens": counts.output_tokens,
            "input_audio_tokens": 0,
            "output_audio_tokens": 0,
        }
    result |= {
        "num_model_requests": counts.requests,
        "project_id": None,
        "user_id": None,
        "api_key_id": None,
        "model": model,
    }
    if source == "completions":
        result |= {"batch": None, "service_tier": None}
    return result


def _cost_results(
    usage: list[tuple[tuple[date, str, str, str, str], _Counts]],
    planted: list[tuple[tuple[date, str, str, str], Decimal]],
    by_line_item: bool,
) -> list[dict[str, Any]]:
    lines: dict[str, Decimal] = defaultdict(Decimal)
    million = Decimal(1_000_000)
    for (_, _, model, _, _), counts in usage:
        price = PRICES.get(model)
        if price is None:
            continue
        uncached = counts.input_tokens - counts.cached_tokens
        for item, tokens, rate in (
            ("input", uncached, price[0]),
            ("cached input", counts.cached_tokens, price[1]),
            ("output", counts.output_tokens, price[2]),
        ):
            if tokens:
                lines[f"{model}, {item}"] += tokens * rate / million
    for (_, line_item, _, _), usd in planted:
        lines[line_item] += usd
    if not by_line_item:
        lines = {"": sum(lines.values(), Decimal(0))} if lines else {}
    return [
        {
            "object": "organization.costs.result",
            # OpenAI sends the value as a decimal string of ~40 places.
            "amount": {"value": f"{usd:.39f}", "currency": "usd"},
            "line_item": line_item or None,
            "project_id": None,
            "api_key_id": None,
            "quantity": None,
            "quantity_unit": None,
        }
        for line_item, usd in lines.items()
    ]
