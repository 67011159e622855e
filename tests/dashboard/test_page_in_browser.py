"""The dashboard in headless Chromium: signed in with a `reports` key, the numbers in its DOM are those of
the SQL over the seeded events and the totals those of GET /v1/usage, to the cent. A screenshot is kept in
TEST_ARTIFACTS_DIR (default var/test-artifacts)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.logs import JsonFormatter
from tests.dashboard.conftest import Seeded, make_key, sql
from tests.harness import MASTER_KEY, ThreadedGateway

ARTIFACTS = Path(
    os.environ.get("TEST_ARTIFACTS_DIR", Path(__file__).resolve().parents[2] / "var/test-artifacts")
)


def money(amount: Decimal) -> str:
    cents = amount.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    if cents == 0 and amount > 0:
        return "<$0.01"
    return f"${cents:,.2f}"


def count(n: int) -> str:
    return f"{n:,}"


def percent(part: int, whole: int) -> str:
    tenths = (2000 * part + whole) // (2 * whole)  # half up
    return f"{tenths // 10}.{tenths % 10}%"


def latency(ms: int) -> str:
    if ms < 1000:
        return f"{ms} ms"
    hundredths = (ms + 5) // 10
    return f"{hundredths // 100}.{hundredths % 100:02d} s"


@pytest.fixture
def page(browser: Any, seeded: Seeded) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1360, "height": 1000}, device_scale_factor=1)
    opened = context.new_page()
    requests: list[str] = []
    opened.on("request", lambda request: requests.append(request.url))
    opened.requests = requests
    try:
        yield opened
    finally:
        context.close()


def sign_in(
    page: Any, seeded: Seeded, key: str, fragment: str = "", gateway: ThreadedGateway | None = None
) -> None:
    page.goto((gateway or seeded.gateway).url + "/dashboard" + fragment)
    page.fill("#key", key)
    page.click("#login-form button[type=submit]")


def loaded(page: Any) -> None:
    page.wait_for_selector("body[data-loaded=true]", timeout=10_000)


def cells(page: Any, table: str) -> list[list[str]]:
    """The text of each cell of each body row of the table in `table`."""
    rows: list[list[str]] = page.eval_on_selector_all(
        f"{table} tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent.trim()))"
    )
    return rows


def default_range(seeded: Seeded) -> tuple[date, date]:
    """The page's default range: the last 30 UTC days, today included (end exclusive)."""
    today = seeded.now.date()
    return today - timedelta(days=29), today + timedelta(days=1)


def test_signed_in_page_shows_the_seeded_numbers(page: Any, seeded: Seeded) -> None:
    sign_in(page, seeded, seeded.reports_key)
    loaded(page)
    start, end = default_range(seeded)
    totals = sql(
        seeded.url,
        """SELECT count(*) AS requests, sum(total_tokens) AS tokens, sum(cost_usd) AS cost FROM usage_events
           WHERE created_at >= $1::date AND created_at < $2::date""",
        start,
        end,
    )[0]
    assert page.inner_text("#total-cost") == money(totals["cost"])
    assert page.inner_text("#total-requests") == count(totals["requests"])
    assert page.inner_text("#total-tokens") == count(totals["tokens"])

    # The same total as GET /v1/usage, to the cent.
    usage = httpx.get(
        seeded.gateway.url + "/v1/usage",
        params={"start": start.isoformat(), "end": end.isoformat()},
        headers={"authorization": f"Bearer {seeded.reports_key}"},
    ).json()
    assert page.inner_text("#total-cost") == money(sum(Decimal(str(r["cost_usd"])) for r in usage["data"]))

    users = sql(
        seeded.url,
        """SELECT user_id, count(*) AS requests, sum(total_tokens) AS tokens, sum(cost_usd) AS cost
           FROM usage_events WHERE created_at >= $1::date AND created_at < $2::date
           GROUP BY user_id ORDER BY cost DESC, user_id LIMIT 10""",
        start,
        end,
    )
    shown = cells(page, "#users")
    assert [row[:4] for row in shown] == [
        [
            row["user_id"] or "(no user)",
            count(row["requests"]),
            count(row["tokens"]),
            money(row["cost"]),
        ]
        for row in users
    ]

    models = sql(
        seeded.url,
        """SELECT model, count(*) AS requests, sum(prompt_tokens) AS prompt,
                  sum(completion_tokens) AS completion, sum(cost_usd) AS cost
           FROM usage_events WHERE created_at >= $1::date AND created_at < $2::date
           GROUP BY model ORDER BY cost DESC""",
        start,
        end,
    )
    shown = cells(page, "#models")
    assert [row[:5] for row in shown] == [
        [
            row["model"],
            count(row["requests"]),
            count(row["prompt"]),
            count(row["completion"]),
            money(row["cost"]),
        ]
        for row in models
    ]

    # Errors and p95 latency over the last seven days of the range, nearest rank (percentile_disc).
    window_start = seeded.now.date() - timedelta(days=6)
    reliability = sql(
        seeded.url,
        """SELECT feature, count(*) AS requests,
                  count(*) FILTER (WHERE status_code >= 400 OR error_type IS NOT NULL) AS failed,
                  percentile_disc(0.95) WITHIN GROUP (ORDER BY latency_ms) AS p95
           FROM usage_events WHERE created_at >= $1::date AND created_at < $2::date
           GROUP BY feature ORDER BY requests DESC, feature NULLS LAST""",
        window_start,
        end,
    )
    assert page.inner_text("#error-rate") == percent(
        sum(row["failed"] for row in reliability), sum(row["requests"] for row in reliability)
    )
    shown = cells(page, "#reliability")
    assert shown == [
        [
            row["feature"] or "(no feature)",
            count(row["requests"]),
            count(row["failed"]),
            percent(row["failed"], row["requests"]),
            latency(row["p95"]),
        ]
        for row in reliability
    ]

    # Each day's bar is that day's cost.
    daily = sql(
        seeded.url,
        """SELECT (created_at AT TIME ZONE 'UTC')::date AS day, sum(cost_usd) AS cost FROM usage_events
           WHERE created_at >= $1::date GROUP BY 1 ORDER BY 1""",
        start,
    )
    bars = page.eval_on_selector_all(
        "#daily g[data-day]", "gs => gs.map(g => [g.dataset.day, g.dataset.cost])"
    )
    assert [(day, Decimal(cost)) for day, cost in bars] == [
        (row["day"].isoformat(), row["cost"]) for row in daily
    ]

    # The key is in this tab's sessionStorage only: not in the URL, not in any request's URL.
    assert page.evaluate("sessionStorage.getItem('llm-gateway.dashboard.key')") == seeded.reports_key
    assert all(seeded.reports_key not in url for url in page.requests)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.mouse.move(0, 0)  # no column highlighted under the pointer
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)


def test_a_filter_in_the_fragment_narrows_every_number(page: Any, seeded: Seeded) -> None:
    start, end = default_range(seeded)
    sign_in(page, seeded, MASTER_KEY, "#feature=sql-helper")
    loaded(page)
    totals = sql(
        seeded.url,
        """SELECT count(*) AS requests, sum(cost_usd) AS cost FROM usage_events
           WHERE feature = 'sql-helper' AND created_at >= $1::date AND created_at < $2::date""",
        start,
        end,
    )[0]
    assert page.input_value("#feature") == "sql-helper"
    assert page.inner_text("#total-cost") == money(totals["cost"])
    assert page.inner_text("#total-requests") == count(totals["requests"])
    assert [row[0] for row in cells(page, "#reliability")] == ["sql-helper"]


def test_a_key_without_the_reports_scope_is_turned_away(page: Any, seeded: Seeded) -> None:
    sign_in(page, seeded, make_key(seeded.gateway, ["*"]))
    page.wait_for_selector("#login-error:not([hidden])")
    assert "'reports' scope" in page.inner_text("#login-error")
    assert page.is_hidden("#app")
    assert page.evaluate("sessionStorage.getItem('llm-gateway.dashboard.key')") is None


def test_a_range_without_usage_shows_empty_states(page: Any, seeded: Seeded) -> None:
    sign_in(page, seeded, seeded.reports_key, "#start=2020-01-01&end=2020-01-31")
    loaded(page)
    assert page.inner_text("#total-cost") == "$0.00"
    assert page.inner_text("#total-requests") == "0"
    for card in ("#daily", "#users", "#models", "#reliability"):
        assert page.is_visible(f"{card} .empty")


def test_a_range_too_long_shows_the_gateways_error(page: Any, seeded: Seeded) -> None:
    sign_in(page, seeded, seeded.reports_key, "#start=2026-01-01&end=2026-06-30")
    page.wait_for_selector("#error:not([hidden])")
    assert "at most 92 days" in page.inner_text("#error")


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_the_key_is_in_no_log_line(page: Any, seeded: Seeded, make_settings: Callable[..., Settings]) -> None:
    """A gateway logging every request (info): the page's requests are in its access lines, the key is
    not, in any line."""
    root = logging.getLogger()
    level = root.level
    gateway = ThreadedGateway(make_settings(database_url=seeded.url, log_level="info")).start()
    captured = _Lines()
    root.addHandler(captured)
    try:
        sign_in(page, seeded, seeded.reports_key, "#feature=search", gateway=gateway)
        loaded(page)
    finally:
        # The access line is written after the response's last byte, so the page can have its data
        # before the line exists: stopping the server first lets every request it took finish logging.
        gateway.stop()
        root.removeHandler(captured)
        root.setLevel(level)
    assert any("/v1/usage/summary" in line for line in captured.lines)
    assert not [line for line in captured.lines if seeded.reports_key in line]
