"""The fake's organization Usage and Costs APIs answer in OpenAI's shapes, to the admin key only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import pytest

from tests.fakes.openai_upstream import FakeOpenAI

# The keys of OpenAI's documented examples (API reference, "Usage" and "Costs").
PAGE_KEYS = {"object", "data", "has_more", "next_page"}
BUCKET_KEYS = {"object", "start_time", "end_time", "results"}
COMPLETIONS_KEYS = {
    "object",
    "input_tokens",
    "output_tokens",
    "input_cached_tokens",
    "num_model_requests",
    "project_id",
    "user_id",
    "api_key_id",
    "model",
    "batch",
}
COST_KEYS = {"object", "amount", "line_item", "project_id"}


def _midnight(days_ago: int) -> int:
    today = datetime.now(UTC).date() - timedelta(days=days_ago)
    return int(datetime(today.year, today.month, today.day, tzinfo=UTC).timestamp())


def _get(fake: FakeOpenAI, path: str, key: str | None, **params: object) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{fake.base_url}/organization/{path}", params=params, headers=headers)


@pytest.mark.parametrize("path", ["usage/completions", "usage/embeddings", "costs"])
def test_only_the_admin_key_reads_them(fake: FakeOpenAI, path: str) -> None:
    assert _get(fake, path, None, start_time=0).status_code == 401
    refused = _get(fake, path, fake.api_key, start_time=0)
    assert refused.status_code == 403
    assert "insufficient permissions" in refused.json()["error"]["message"]
    assert _get(fake, path, "sk-admin-other", start_time=0).json()["error"]["code"] == "invalid_api_key"
    assert _get(fake, path, fake.organization.admin_key, start_time=0).status_code == 200
    # The admin key is not a model key.
    chat = httpx.post(
        f"{fake.base_url}/chat/completions",
        json={"model": "gpt-4o-mini", "messages": []},
        headers={"authorization": f"Bearer {fake.organization.admin_key}"},
    )
    assert chat.status_code == 401


def test_usage_pages_in_openai_shapes(fake: FakeOpenAI) -> None:
    start = _midnight(4)
    day = datetime.fromtimestamp(start, UTC).date()
    fake.organization.plant(day, "gpt-4o-mini-2024-07-18", requests=2, input_tokens=30, cached_tokens=10)
    params = {"start_time": start, "end_time": _midnight(-1), "group_by": "model", "limit": 2}
    first = _get(fake, "usage/completions", fake.organization.admin_key, **params).json()
    assert set(first) == PAGE_KEYS and first["object"] == "page"
    assert first["has_more"] is True and first["next_page"].startswith("page_")
    assert [set(bucket) for bucket in first["data"]] == [BUCKET_KEYS, BUCKET_KEYS]
    assert first["data"][0]["end_time"] - first["data"][0]["start_time"] == 86400
    (result,) = first["data"][0]["results"]
    assert set(result) >= COMPLETIONS_KEYS
    assert result["object"] == "organization.usage.completions.result"
    assert (result["model"], result["num_model_requests"], result["input_cached_tokens"]) == (
        "gpt-4o-mini-2024-07-18",
        2,
        10,
    )
    starts = [bucket["start_time"] for bucket in first["data"]]
    page = first
    while page["has_more"]:
        params["page"] = page["next_page"]
        page = _get(fake, "usage/completions", fake.organization.admin_key, **params).json()
        starts += [bucket["start_time"] for bucket in page["data"]]
    assert page["next_page"] is None
    assert starts == [start + n * 86400 for n in range(5)]
    assert (
        _get(fake, "usage/completions", fake.organization.admin_key, start_time=0, limit=32).status_code
        == 400
    )


def test_costs_per_line_item(fake: FakeOpenAI) -> None:
    start = _midnight(0)
    day = datetime.fromtimestamp(start, UTC).date()
    fake.organization.plant(day, "gpt-4o-mini-2024-07-18", requests=1, input_tokens=1000, output_tokens=100)
    body = _get(fake, "costs", fake.organization.admin_key, start_time=start, group_by="line_item").json()
    results = {r["line_item"]: r for r in body["data"][0]["results"]}
    assert set(results) == {"gpt-4o-mini-2024-07-18, input", "gpt-4o-mini-2024-07-18, output"}
    line = results["gpt-4o-mini-2024-07-18, input"]
    assert set(line) >= COST_KEYS and line["object"] == "organization.costs.result"
    assert line["amount"]["currency"] == "usd"
    assert Decimal(line["amount"]["value"]) == Decimal("0.00015")
