"""GET /v1/usage/summary and the `reports` scope, over HTTP; the page's files and the headers they carry."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.access.endpoint_classes import parse_scopes
from app.db.migrate import upgrade
from tests.dashboard.conftest import Seeded, make_key, sql
from tests.dashboard.seed import events as seed_events
from tests.dashboard.seed import write
from tests.db import database_down, database_up
from tests.harness import MASTER_KEY, ThreadedGateway

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "app" / "static"


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def month(seeded: Seeded) -> dict[str, str]:
    today = seeded.now.date()
    return {"start": (today - timedelta(days=29)).isoformat(), "end": (today + timedelta(days=1)).isoformat()}


def summary(seeded: Seeded, key: str = MASTER_KEY, **params: str) -> dict[str, Any]:
    response = httpx.get(
        seeded.gateway.url + "/v1/usage/summary", params={**month(seeded), **params}, headers=bearer(key)
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_totals_are_those_of_v1_usage_to_the_cent(seeded: Seeded) -> None:
    body = summary(seeded, seeded.reports_key)
    usage = httpx.get(
        seeded.gateway.url + "/v1/usage",
        params={**month(seeded), "group_by": "feature"},
        headers=bearer(seeded.reports_key),
    ).json()["data"]
    assert body["totals"]["requests"] == sum(row["requests"] for row in usage)
    assert Decimal(body["totals"]["cost_usd"]).quantize(Decimal("0.01")) == sum(
        Decimal(str(row["cost_usd"])) for row in usage
    ).quantize(Decimal("0.01"))
    # And exactly the events' sum, every digit.
    events = sql(seeded.url, "SELECT sum(cost_usd) AS cost, count(*) AS n FROM usage_events")[0]
    assert Decimal(body["totals"]["cost_usd"]) == events["cost"]
    assert body["totals"]["requests"] == events["n"] == len(seeded.events)


def test_each_day_is_its_features_and_other(seeded: Seeded) -> None:
    body = summary(seeded)
    # Eleven features seeded (one of them "none"): eight named, the rest summed as `other`.
    assert len(body["features"]) == 8
    assert body["other_features"] is True
    for day in body["days"]:
        parts = sum(map(Decimal, day["by_feature"])) + Decimal(day["other_usd"])
        assert parts == Decimal(day["cost_usd"])
    assert sum(Decimal(day["cost_usd"]) for day in body["days"]) == Decimal(body["totals"]["cost_usd"])
    top = sql(
        seeded.url,
        "SELECT feature FROM usage_events GROUP BY feature ORDER BY sum(cost_usd) DESC LIMIT 8",
    )
    assert body["features"] == [row["feature"] for row in top]


def test_lists_are_bounded_and_filters_apply(seeded: Seeded) -> None:
    body = summary(seeded, model="gpt-4o")
    assert len(body["top_users"]) == 10
    assert [row["model"] for row in body["models"]] == ["gpt-4o"]
    expected = sql(
        seeded.url,
        "SELECT count(*) AS n, sum(cost_usd) AS cost FROM usage_events WHERE model = 'gpt-4o'",
    )[0]
    assert body["totals"]["requests"] == expected["n"]
    assert Decimal(body["totals"]["cost_usd"]) == expected["cost"]
    assert body["filters"] == {"model": "gpt-4o"}


def test_p95_is_the_nearest_rank_latency(seeded: Seeded) -> None:
    body = summary(seeded, feature="search")
    window_start = seeded.now.date() - timedelta(days=6)
    expected = sql(
        seeded.url,
        """SELECT count(*) AS requests,
                  count(*) FILTER (WHERE status_code >= 400 OR error_type IS NOT NULL) AS failed,
                  percentile_disc(0.95) WITHIN GROUP (ORDER BY latency_ms) AS p95
           FROM usage_events WHERE feature = 'search' AND created_at >= $1::date""",
        window_start,
    )[0]
    assert body["reliability"]["start"] == window_start.isoformat()
    assert (body["reliability"]["requests"], body["reliability"]["failed"]) == (
        expected["requests"],
        expected["failed"],
    )
    assert body["reliability"]["features"] == [
        {
            "feature": "search",
            "requests": expected["requests"],
            "failed": expected["failed"],
            "p95_latency_ms": expected["p95"],
        }
    ]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"start": "2026-01-01", "end": "2026-06-01"}, "end"),
        ({"start": "last week"}, "start"),
        ({"start": "2026-05-02", "end": "2026-05-01"}, "end"),
        ({"feature": "x" * 257}, "feature"),
    ],
)
def test_bad_ranges_and_filters_are_400(seeded: Seeded, params: dict[str, str], param: str) -> None:
    response = httpx.get(
        seeded.gateway.url + "/v1/usage/summary",
        params={**month(seeded), **params},
        headers=bearer(MASTER_KEY),
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_summaries_beyond_the_concurrency_bound_get_429(seeded: Seeded) -> None:
    state = seeded.gateway.app.services
    state.summaries_in_flight += 2
    try:
        response = httpx.get(seeded.gateway.url + "/v1/usage/summary", headers=bearer(MASTER_KEY))
    finally:
        state.summaries_in_flight -= 2
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "reports_busy"


@pytest.mark.parametrize("path", ["/v1/usage", "/v1/usage/summary"])
def test_reports_need_the_master_key_or_the_reports_scope(seeded: Seeded, path: str) -> None:
    url = seeded.gateway.url + path
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers=bearer("sk-gw-not-a-key")).status_code == 401
    # Neither `*` nor the default scopes imply `reports`.
    for scopes in (["*"], ["chat", "embeddings"]):
        response = httpx.get(url, headers=bearer(make_key(seeded.gateway, scopes)))
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "scope_not_allowed"
    for key in (MASTER_KEY, seeded.reports_key, make_key(seeded.gateway, ["*", "reports"])):
        assert httpx.get(url, headers=bearer(key), params=month(seeded)).status_code == 200


def test_a_reports_key_calls_nothing_else(seeded: Seeded) -> None:
    sdk = openai.OpenAI(base_url=seeded.gateway.base_url, api_key=seeded.reports_key, max_retries=0)
    with sdk, pytest.raises(openai.PermissionDeniedError) as raised:
        sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert raised.value.code == "scope_not_allowed"


def test_the_admin_api_keeps_reports_beside_every_class(seeded: Seeded) -> None:
    response = httpx.post(
        seeded.gateway.url + "/admin/keys",
        json={"name": "finance", "scopes": ["reports", "*", "chat"]},
        headers=bearer(MASTER_KEY),
    )
    assert response.json()["scopes"] == ["*", "reports"]
    key_id = response.json()["id"]
    patched = httpx.patch(
        seeded.gateway.url + f"/admin/keys/{key_id}", json={"scopes": ["*"]}, headers=bearer(MASTER_KEY)
    )
    assert patched.json()["scopes"] == ["*"]
    assert parse_scopes(["reports"]) == ["reports"]
    with pytest.raises(ValueError, match="'reports' to read the usage reports"):
        parse_scopes(["report"])


def test_the_page_and_its_files_carry_a_strict_policy(seeded: Seeded) -> None:
    for path, kind in [
        ("/dashboard", "text/html"),
        ("/dashboard/dashboard.js", "text/javascript"),
        ("/dashboard/dashboard.css", "text/css"),
    ]:
        response = httpx.get(seeded.gateway.url + path)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith(kind)
        policy = response.headers["content-security-policy"]
        assert "default-src 'none'" in policy
        assert "connect-src 'self'" in policy
        assert "form-action 'none'" in policy
        assert response.headers["x-content-type-options"] == "nosniff"
    for path in ("/dashboard/dashboard.html", "/dashboard/seed.py", "/dashboard/..%2f__init__.py"):
        assert httpx.get(seeded.gateway.url + path).status_code in (400, 404)


def test_the_page_fetches_nothing_from_elsewhere() -> None:
    for file in STATIC.iterdir():
        urls = set(re.findall(r"https?://[^\s\"'`)]+", file.read_text()))
        # The SVG namespace is a name, not a fetch.
        assert urls <= {"http://www.w3.org/2000/svg"}, (file.name, urls)


def test_the_page_ships_in_the_wheel() -> None:
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "app"
    ]
    for file in STATIC.iterdir():
        relative = file.relative_to(ROOT / "app").as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative


def test_the_summary_on_embedded_sqlite(make_settings: Any, tmp_path: Path) -> None:
    """`make run`'s database: the same answer without Postgres' percentile functions."""
    upgrade(None, tmp_path)
    now = datetime.now(UTC)
    made = [
        event._replace(request_id=f"req_sqlite{n}", created_at=now - timedelta(minutes=n), latency_ms=n + 1)
        for n, event in enumerate(seed_events(now)[:20])
    ]
    made = [event._replace(feature="only") for event in made]
    write(None, made, tmp_path)
    gateway = ThreadedGateway(make_settings(database_url=None, data_dir=tmp_path)).start()
    try:
        response = httpx.get(
            gateway.url + "/v1/usage/summary",
            params={"start": (now - timedelta(days=1)).date().isoformat()},
            headers=bearer(MASTER_KEY),
        )
    finally:
        gateway.stop()
    body = response.json()
    assert body["totals"]["requests"] == 20
    assert Decimal(body["totals"]["cost_usd"]) == sum(e.cost_usd or Decimal(0) for e in made)
    failed = sum(1 for e in made if e.status_code >= 400)
    # Latencies 1..20 ms: the nearest-rank p95 is the 19th.
    assert body["reliability"]["features"] == [
        {"feature": "only", "requests": 20, "failed": failed, "p95_latency_ms": 19}
    ]


@pytest.mark.parametrize("path", ["/v1/usage/summary", "/v1/usage", "/v1/usage?format=csv"])
def test_a_database_outage_is_a_503_not_a_500(
    path: str, make_settings: Any, scratch_db: tuple[str, str]
) -> None:
    name, url = scratch_db
    gateway = ThreadedGateway(make_settings(database_url=url)).start()
    try:
        database_down(name)
        response = httpx.get(gateway.url + path, headers=bearer(MASTER_KEY), timeout=30)
    finally:
        database_up(name)
        gateway.stop()
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "reports_unavailable"
