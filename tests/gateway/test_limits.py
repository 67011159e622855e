"""Rate limits, budgets and prompt budgets through the gateway, with real Redis and real Postgres."""

from __future__ import annotations

import concurrent.futures
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import sdk_client
from tests.db import wait_for_rows
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, GatewayProcess, ThreadedGateway, wait_until

MASTER = {"authorization": f"Bearer {MASTER_KEY}"}
MESSAGES = [{"role": "user", "content": "hi"}]
REDIS_URL = "redis://127.0.0.1:6379/0"


def make_key(gateway_url: str, **spec: Any) -> dict[str, Any]:
    response = httpx.post(gateway_url + "/admin/keys", json={"name": "limited", **spec}, headers=MASTER)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def configured(
    start_gateway: Callable[..., ThreadedGateway], tmp_path: Path, text: str, **kw: Any
) -> ThreadedGateway:
    path = tmp_path / f"gateway-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(text)
    return start_gateway(config_file=path, **kw)


def test_key_rpm_limit(gateway: ThreadedGateway, fake: FakeOpenAI) -> None:
    key = make_key(gateway.url, rpm_limit=3)
    with sdk_client(gateway.base_url, api_key=key["secret"]) as sdk:
        for _ in range(3):
            sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
        with pytest.raises(openai.RateLimitError) as caught:
            sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.code == "rate_limit_exceeded"
    assert key["id"] in caught.value.message
    # A sliding window: the wait may reach into the next minute, never beyond it.
    assert 1 <= int(caught.value.response.headers["retry-after"]) <= 120
    assert len(fake.requests) == 3


def test_feature_tpm_and_user_rpm_from_config(
    start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI, tmp_path: Path
) -> None:
    gateway = configured(start_gateway, tmp_path, "features: {summaries: {tpm: 1000}}\nusers: {rpm: 2}\n")
    with sdk_client(gateway.base_url) as sdk:
        # Estimated at its max_tokens, this call alone is over the feature's tokens per minute.
        with pytest.raises(openai.RateLimitError) as caught:
            sdk.chat.completions.create(
                model="gpt-4o",
                messages=MESSAGES,
                max_tokens=5000,
                extra_headers={"X-Feature": "summaries"},  # type: ignore[arg-type]
            )
        assert "tokens per minute" in caught.value.message and "summaries" in caught.value.message
        for _ in range(2):
            sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, user="alice")  # type: ignore[arg-type]
        with pytest.raises(openai.RateLimitError) as caught:
            sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, user="alice")  # type: ignore[arg-type]
        assert "user 'alice'" in caught.value.message
        # Another user has a limit of their own.
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, user="bob")  # type: ignore[arg-type]
    assert len(fake.requests) == 3


# gpt-4o: 10,000 prompt tokens at $2.50 and 10,000 completion tokens at $10.00 per 1M = $0.125 a call.
EXPENSIVE = {"prompt_tokens": 10_000, "completion_tokens": 10_000}


def _spent(gateway: ThreadedGateway, scope: str, period: str) -> Decimal:
    rows = httpx.get(gateway.url + "/admin/budgets", headers=MASTER).json()["data"]
    return next(Decimal(r["spent_usd"]) for r in rows if r["scope"] == scope and r["period"] == period)


def test_budget_trips_at_the_cap_and_resets_at_the_day_boundary(
    start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI, tmp_path: Path
) -> None:
    gateway = configured(start_gateway, tmp_path, "features: {reports: {budget_daily_usd: 0.25}}\n")
    guard = gateway.app.services.guard
    evening = datetime(2031, 3, 14, 23, 59, 58, tzinfo=UTC)
    guard.clock = lambda: evening
    headers = {"X-Feature": "reports"}
    with sdk_client(gateway.base_url) as sdk:
        for expected in (Decimal("0.125"), Decimal("0.25")):
            fake.reply("ok", usage=EXPENSIVE)
            sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers=headers)  # type: ignore[arg-type]
            wait_until(lambda expected=expected: _spent(gateway, "feature:reports", "day") == expected)
        with pytest.raises(openai.RateLimitError) as caught:
            sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers=headers)  # type: ignore[arg-type]
        assert caught.value.code == "budget_exceeded"
        assert caught.value.message.endswith(
            "The daily budget of $0.25 for feature 'reports' is spent ($0.25 so far); "
            "it resets at 2031-03-15T00:00:00Z."
        )
        assert caught.value.response.headers["x-should-retry"] == "false"
        assert caught.value.response.headers["retry-after"] == "2"
        assert len(fake.requests) == 2
        guard.clock = lambda: evening + timedelta(seconds=2)
        fake.reply("a new day", usage=EXPENSIVE)
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers=headers)  # type: ignore[arg-type]
    assert len(fake.requests) == 3


def test_with_metering_off_budgets_still_settle_and_requests_are_still_counted(
    start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI, tmp_path: Path
) -> None:
    """GATEWAY_METERING=false turns off usage events only: no rows, no token or cost metrics."""
    gateway = configured(
        start_gateway, tmp_path, "features: {unmetered: {budget_daily_usd: 0.2}}\n", metering=False
    )
    headers = {"X-Feature": "unmetered"}
    with sdk_client(gateway.base_url) as sdk:
        fake.reply("ok", usage=EXPENSIVE)
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers=headers)  # type: ignore[arg-type]
        wait_until(lambda: _spent(gateway, "feature:unmetered", "day") == Decimal("0.125"))
        fake.reply("ok", usage=EXPENSIVE)
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers=headers)  # type: ignore[arg-type]
        wait_until(lambda: _spent(gateway, "feature:unmetered", "day") == Decimal("0.25"))
        with pytest.raises(openai.RateLimitError) as caught:
            sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers=headers)  # type: ignore[arg-type]
    assert caught.value.code == "budget_exceeded"
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'gateway_requests_total{route="/v1/chat/completions",status="200"} 2.0' in metrics
    assert 'gateway_requests_total{route="/v1/chat/completions",status="429"} 1.0' in metrics
    assert "gateway_tokens_total{" not in metrics


def test_key_monthly_budget_trips_before_a_call_that_would_cross_it(
    gateway: ThreadedGateway, fake: FakeOpenAI
) -> None:
    key = make_key(gateway.url, budget_monthly_usd="0.01")
    with sdk_client(gateway.base_url, api_key=key["secret"]) as sdk:
        # Estimated from max_tokens: 1,000,000 output tokens of gpt-4o would cost $10.
        with pytest.raises(openai.RateLimitError) as caught:
            sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=1_000_000)  # type: ignore[arg-type]
        assert "monthly budget of $0.01" in caught.value.message
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=10)  # type: ignore[arg-type]
    assert len(fake.requests) == 1


CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "old question " * 40},
    {"role": "assistant", "content": "old answer " * 40},
    {"role": "user", "content": "what is the weather"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny " * 30},
    {"role": "assistant", "content": "It is sunny."},
    {"role": "user", "content": "and tomorrow?"},
]


def test_prompt_budget_truncates_oldest_messages_keeping_tool_pairs(
    start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI, tmp_path: Path, database_url: str
) -> None:
    gateway = configured(
        start_gateway, tmp_path, "features: {chat: {max_prompt_tokens: 120, prompt_overflow: truncate}}\n"
    )
    request_id = f"trunc-{uuid.uuid4().hex}"
    with sdk_client(gateway.base_url) as sdk:
        sdk.chat.completions.create(
            model="gpt-4o",
            messages=CONVERSATION,
            extra_headers={"X-Feature": "chat", "X-Request-Id": request_id},  # type: ignore[arg-type]
        )
    sent = fake.requests[0].json["messages"]
    assert sent[0] == CONVERSATION[0]
    assert sent[-1] == CONVERSATION[-1]
    assert CONVERSATION[1] not in sent and CONVERSATION[2] not in sent
    # The tool call and its result leave together or stay together.
    assert (CONVERSATION[4] in sent) == (CONVERSATION[5] in sent)
    assert len(sent) < len(CONVERSATION)
    (row,) = wait_for_rows(database_url, request_id)
    assert row["prompt_truncated"] is True


def test_prompt_budget_rejects_with_the_limit_and_the_size(
    start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI, tmp_path: Path
) -> None:
    gateway = configured(start_gateway, tmp_path, "features: {strict: {max_prompt_tokens: 50}}\n")
    with sdk_client(gateway.base_url) as sdk, pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(
            model="gpt-4o", messages=CONVERSATION, extra_headers={"X-Feature": "strict"}
        )  # type: ignore[arg-type]
    assert caught.value.code == "prompt_too_long"
    assert "allows at most 50" in caught.value.message
    assert "The prompt is" in caught.value.message
    assert fake.requests == []


def test_two_worker_processes_share_one_limit_through_redis(
    fake_server: FakeOpenAI, database_url: str, tmp_path: Path
) -> None:
    fake_server.reset()
    gateway = GatewayProcess(
        fake_server, database_url, tmp_path, env={"GATEWAY_REDIS_URL": REDIS_URL}, args=("--workers", "2")
    ).start()
    try:
        key = make_key(gateway.url, rpm_limit=10)
        headers = {"authorization": f"Bearer {key['secret']}"}
        body = {"model": "gpt-4o", "messages": MESSAGES}
        with httpx.Client(limits=httpx.Limits(max_keepalive_connections=0)) as http:
            # No keep-alive: each call is a new connection, which either worker may accept.
            def call(_: int) -> int:
                return http.post(gateway.url + "/v1/chat/completions", json=body, headers=headers).status_code

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                statuses = list(pool.map(call, range(30)))
        assert statuses.count(200) == 10
        assert statuses.count(429) == 20
        assert len(fake_server.requests) == 10
    finally:
        gateway.stop()


def test_unreachable_redis_fails_open_without_hanging(
    start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI
) -> None:
    gateway = start_gateway(redis_url="redis://127.0.0.1:1/0")
    key = make_key(gateway.url, rpm_limit=1, budget_daily_usd="0.000001")
    with sdk_client(gateway.base_url, api_key=key["secret"], timeout=10) as sdk:
        for _ in range(3):
            sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert len(fake.requests) == 3
    metrics = httpx.get(gateway.url + "/metrics").text
    assert "gateway_limits_degraded 1.0" in metrics


def test_a_new_process_starts_from_the_spend_in_the_database(
    scratch_db: tuple[str, str],
    start_gateway: Callable[..., ThreadedGateway],
    fake: FakeOpenAI,
    tmp_path: Path,
) -> None:
    _, url = scratch_db
    config = "features: {reports: {budget_daily_usd: 10}}\n"
    first = configured(start_gateway, tmp_path, config, database_url=url)
    key = make_key(first.url, budget_monthly_usd="100")
    request_id = f"seed-{uuid.uuid4().hex}"
    fake.reply("ok", usage=EXPENSIVE)
    with sdk_client(first.base_url, api_key=key["secret"]) as sdk:
        sdk.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            extra_headers={"X-Feature": "reports", "X-Request-Id": request_id},  # type: ignore[arg-type]
        )
    wait_for_rows(url, request_id)
    second = configured(start_gateway, tmp_path, config, database_url=url)
    assert _spent(second, "feature:reports", "day") == Decimal("0.125")
    assert _spent(second, f"key:{key['id']}", "month") == Decimal("0.125")
