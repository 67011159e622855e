"""usage_daily against usage_events, the README's dashboard SQL, GET /v1/usage and `llm-gateway usage`."""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from tests.db import create_database, drop_database, fetch, wait_for_rows
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, ThreadedGateway

README = Path(__file__).resolve().parents[2] / "README.md"
AUTH = {"authorization": f"Bearer {MASTER_KEY}"}
# (feature, user, model, prompt, completion) per call.
CALLS = [
    ("search", "alice", "gpt-4o-mini", 1000, 100),
    ("search", "alice", "gpt-4o-mini", 2000, 200),
    ("search", "bob", "gpt-4o", 500, 50),
    ("summaries", "bob", "gpt-4o", 4000, 400),
    ("summaries", None, "gpt-4o-mini", 300, 30),
    (None, "carol", "gpt-4.1", 100, 10),
]


@pytest.fixture(scope="module")
def populated(
    fake_server: FakeOpenAI, make_settings: Callable[..., object]
) -> Iterator[tuple[str, ThreadedGateway]]:
    name, url = create_database("gateway_reports")
    gateway = ThreadedGateway(make_settings(database_url=url)).start()  # type: ignore[arg-type]
    fake_server.reset()
    ids = []
    with openai.OpenAI(base_url=gateway.base_url, api_key=MASTER_KEY, max_retries=0) as sdk:
        for feature, user, model, prompt, completion in CALLS:
            request_id = f"report-{uuid.uuid4().hex}"
            ids.append(request_id)
            fake_server.reply("ok", usage={"prompt_tokens": prompt, "completion_tokens": completion})
            headers = {"X-Request-Id": request_id}
            if feature:
                headers["X-Feature"] = feature
            if user:
                headers["X-User-Id"] = user
            sdk.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "x"}], extra_headers=headers
            )
    wait_for_rows(url, *ids)
    try:
        yield url, gateway
    finally:
        gateway.stop()
        drop_database(name)


def _expected_cost(model: str, prompt: int, completion: int) -> Decimal:
    per_1m = {"gpt-4o-mini": ("0.15", "0.60"), "gpt-4o": ("2.50", "10.00"), "gpt-4.1": ("2.00", "8.00")}[
        model
    ]
    return (prompt * Decimal(per_1m[0]) + completion * Decimal(per_1m[1])) / 1_000_000


def _cost_by(key: int) -> dict[str | None, Decimal]:
    totals: dict[str | None, Decimal] = {}
    for call in CALLS:
        totals[call[key]] = totals.get(call[key], Decimal(0)) + _expected_cost(call[2], call[3], call[4])
    return totals


def test_usage_daily_equals_the_sums_of_usage_events(populated: tuple[str, ThreadedGateway]) -> None:
    url, _ = populated
    events = fetch(
        url,
        """SELECT (created_at AT TIME ZONE 'UTC')::date AS day, COALESCE(feature, '') AS feature,
                  COALESCE(user_id, '') AS user_id, COALESCE(model, '') AS model, COUNT(*) AS requests,
                  SUM(prompt_tokens) AS prompt_tokens, SUM(completion_tokens) AS completion_tokens,
                  SUM(total_tokens) AS total_tokens, SUM(COALESCE(cost_usd, 0)) AS cost_usd
           FROM usage_events GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4""",
    )
    daily = fetch(
        url,
        """SELECT day, feature, user_id, model, requests, prompt_tokens, completion_tokens, total_tokens,
                  cost_usd FROM usage_daily ORDER BY 1, 2, 3, 4""",
    )
    assert len(events) == 5
    assert daily == events


def _readme_queries() -> list[str]:
    section = README.read_text().split("### Cost queries in SQL", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sql\n(.*?)```", section, flags=re.S)


def test_readme_documents_the_standard_dashboards() -> None:
    assert len(_readme_queries()) == 4


def test_dashboard_cost_per_feature_per_day(populated: tuple[str, ThreadedGateway]) -> None:
    rows = fetch(populated[0], _readme_queries()[0])
    assert {row["feature"]: row["cost_usd"] for row in rows} == _cost_by(0)
    assert sum(row["requests"] for row in rows) == len(CALLS)


def test_dashboard_top_users_this_month(populated: tuple[str, ThreadedGateway]) -> None:
    rows = fetch(populated[0], _readme_queries()[1])
    assert [row["user_id"] for row in rows] == ["bob", "alice", "carol", None]
    assert {row["user_id"]: row["cost_usd"] for row in rows} == _cost_by(1)


def test_dashboard_tokens_and_cost_by_model(populated: tuple[str, ThreadedGateway]) -> None:
    rows = {row["model"]: row for row in fetch(populated[0], _readme_queries()[2])}
    assert rows["gpt-4o-mini"]["prompt_tokens"] == 3300
    assert rows["gpt-4o-mini"]["completion_tokens"] == 330
    assert rows["gpt-4o"]["requests"] == 2
    assert {model: row["cost_usd"] for model, row in rows.items()} == _cost_by(2)


def test_dashboard_errors_latency_cache_per_feature(populated: tuple[str, ThreadedGateway]) -> None:
    rows = {row["feature"]: row for row in fetch(populated[0], _readme_queries()[3])}
    assert rows["search"]["requests"] == 3
    assert rows["search"]["failed"] == 0
    assert rows["search"]["p95_latency_ms"] >= 0


def test_usage_endpoint_groups_and_filters(populated: tuple[str, ThreadedGateway]) -> None:
    _, gateway = populated
    response = httpx.get(gateway.url + "/v1/usage", params={"group_by": "feature"}, headers=AUTH)
    assert response.status_code == 200
    body = response.json()
    assert body["group_by"] == ["feature"]
    by_feature = {row["feature"]: row for row in body["data"]}
    assert by_feature["search"]["requests"] == 3
    assert by_feature["search"]["prompt_tokens"] == 3500
    assert Decimal(str(by_feature["search"]["cost_usd"])) == _cost_by(0)["search"]
    assert by_feature[None]["requests"] == 1
    response = httpx.get(
        gateway.url + "/v1/usage", params={"group_by": "user,model", "feature": "search"}, headers=AUTH
    )
    rows = {(row["user"], row["model"]): row["requests"] for row in response.json()["data"]}
    assert rows == {("alice", "gpt-4o-mini"): 2, ("bob", "gpt-4o"): 1}


def test_usage_endpoint_csv(populated: tuple[str, ThreadedGateway]) -> None:
    _, gateway = populated
    today = datetime.now(UTC).date()
    response = httpx.get(
        gateway.url + "/v1/usage",
        params={
            "group_by": "day,model",
            "format": "csv",
            "start": today.isoformat(),
            "end": (today + timedelta(days=1)).isoformat(),
        },
        headers=AUTH,
    )
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert {row["model"] for row in rows} == {"gpt-4o-mini", "gpt-4o", "gpt-4.1"}
    assert all(row["day"] == today.isoformat() for row in rows)
    assert sum(int(row["requests"]) for row in rows) == len(CALLS)
    assert sum(Decimal(row["cost_usd"]) for row in rows) == sum(_cost_by(2).values())


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"group_by": "day,colour"}, "group_by"),
        ({"start": "yesterday"}, "start"),
        ({"start": "2026-05-02", "end": "2026-05-01"}, "end"),
        ({"format": "xml"}, "format"),
    ],
)
def test_usage_endpoint_rejects_bad_params(
    params: dict[str, str], param: str, populated: tuple[str, ThreadedGateway]
) -> None:
    response = httpx.get(populated[1].url + "/v1/usage", params=params, headers=AUTH)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_usage_endpoint_needs_a_key(populated: tuple[str, ThreadedGateway]) -> None:
    assert httpx.get(populated[1].url + "/v1/usage").status_code == 401


def test_cli_usage_prints_a_table(populated: tuple[str, ThreadedGateway]) -> None:
    url, _ = populated
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "usage", "--by", "feature", "--since", "7d"],
        env={**env, "DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "feature",
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cost_usd",
    ]
    search = next(line.split() for line in lines if line.startswith("search"))
    assert search[1:5] == ["3", "3500", "350", "3850"]
    assert Decimal(search[5]) == _cost_by(0)["search"]
