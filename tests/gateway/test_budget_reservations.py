"""What a call's budgets hold while it runs: its worst case, recorded on its usage row, and let go of
however the call ends."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from app.config_file import GatewayConfig
from app.limits.guard import worst_case_output
from tests.conftest import sdk_client
from tests.db import wait_for_rows
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, ThreadedGateway, wait_until

MASTER = {"authorization": f"Bearer {MASTER_KEY}"}
MESSAGES: list[Any] = [{"role": "user", "content": "hold"}]


def _key(url: str, **spec: Any) -> dict[str, str]:
    response = httpx.post(url + "/admin/keys", json={"name": "held", **spec}, headers=MASTER)
    assert response.status_code == 201, response.text
    created: dict[str, str] = response.json()
    return created


def _reserved(url: str, key_id: str) -> Decimal:
    rows = httpx.get(url + "/admin/budgets", headers=MASTER).json()["data"]
    return next(
        Decimal(r["reserved_usd"]) for r in rows if r["scope"] == f"key:{key_id}" and r["period"] == "day"
    )


def _row(database_url: str, request_id: str) -> dict[str, Any]:
    (row,) = wait_for_rows(database_url, request_id)
    return row


def _stream_cut(fake: FakeOpenAI, sdk: openai.OpenAI, headers: dict[str, str]) -> None:
    fake.drop_mid_stream(after_chunks=1)
    with pytest.raises(openai.APIError):
        for _ in sdk.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, max_tokens=50, extra_headers=headers
        ):
            pass


def _client_leaves(fake: FakeOpenAI, sdk: openai.OpenAI, headers: dict[str, str]) -> None:
    fake.hang_stream(chunks_before_hang=1)
    stream = sdk.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, max_tokens=50, extra_headers=headers
    )
    next(iter(stream))
    stream.close()


def _upstream_fails(fake: FakeOpenAI, sdk: openai.OpenAI, headers: dict[str, str]) -> None:
    fake.fail(500, times=10)
    with pytest.raises(openai.InternalServerError):
        sdk.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=50, extra_headers=headers
        )


def _succeeds(fake: FakeOpenAI, sdk: openai.OpenAI, headers: dict[str, str]) -> None:
    sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=50, extra_headers=headers)


@pytest.mark.parametrize("ending", [_succeeds, _upstream_fails, _stream_cut, _client_leaves])
def test_every_ending_lets_go_of_the_hold(
    ending: Callable[[FakeOpenAI, openai.OpenAI, dict[str, str]], None],
    gateway: ThreadedGateway,
    fake: FakeOpenAI,
    database_url: str,
) -> None:
    key = _key(gateway.url, budget_daily_usd="1")
    request_id = f"held-{uuid.uuid4().hex}"
    with sdk_client(gateway.base_url, api_key=key["secret"], timeout=10) as sdk:
        ending(fake, sdk, {"X-Request-Id": request_id})
    row = _row(database_url, request_id)
    # 50 output tokens of gpt-4o-mini at $0.60 per 1M, and the prompt.
    assert Decimal("0.00003") < row["reserved_usd"] < Decimal("0.0001")
    assert row["cost_usd"] <= row["reserved_usd"]
    wait_until(lambda: _reserved(gateway.url, key["id"]) == 0)


def test_a_call_refused_by_a_rate_limit_holds_nothing(gateway: ThreadedGateway, fake: FakeOpenAI) -> None:
    key = _key(gateway.url, budget_daily_usd="1", rpm_limit=1)
    with sdk_client(gateway.base_url, api_key=key["secret"]) as sdk:
        sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=50)
        with pytest.raises(openai.RateLimitError) as caught:
            sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=50)
    assert caught.value.code == "rate_limit_exceeded"
    wait_until(lambda: _reserved(gateway.url, key["id"]) == 0)


def test_a_call_dearer_than_its_reservation_says_so_in_its_row(
    gateway: ThreadedGateway, fake: FakeOpenAI, database_url: str
) -> None:
    key = _key(gateway.url, budget_daily_usd="1")
    request_id = f"dear-{uuid.uuid4().hex}"
    # No max_tokens: 4,096 output tokens reserved by default, 10,000 billed.
    fake.reply("long", usage={"prompt_tokens": 10, "completion_tokens": 10_000})
    with sdk_client(gateway.base_url, api_key=key["secret"]) as sdk:
        sdk.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers={"X-Request-Id": request_id}
        )
    row = _row(database_url, request_id)
    assert row["cost_usd"] == Decimal("0.0060015")
    assert Decimal("0.0024576") < row["reserved_usd"] < Decimal("0.0025")


def test_an_unpriced_model_holds_nothing_and_costs_nothing_counted(
    gateway: ThreadedGateway, fake: FakeOpenAI, database_url: str
) -> None:
    key = _key(gateway.url, budget_daily_usd="0.000001")
    request_id = f"unpriced-{uuid.uuid4().hex}"
    with sdk_client(gateway.base_url, api_key=key["secret"]) as sdk:
        sdk.chat.completions.create(
            model="house-model-7b", messages=MESSAGES, extra_headers={"X-Request-Id": request_id}
        )
    row = _row(database_url, request_id)
    assert row["cost_usd"] is None
    assert row["reserved_usd"] == 0


def _spent(url: str, key_id: str) -> Decimal:
    rows = httpx.get(url + "/admin/budgets", headers=MASTER).json()["data"]
    return next(
        Decimal(r["spent_usd"]) for r in rows if r["scope"] == f"key:{key_id}" and r["period"] == "day"
    )


def test_a_background_response_lets_go_of_its_hold_and_is_charged_once_when_done(
    gateway: ThreadedGateway, fake: FakeOpenAI, database_url: str
) -> None:
    key = _key(gateway.url, budget_daily_usd="1")
    with sdk_client(gateway.base_url, api_key=key["secret"]) as sdk:
        queued = sdk.responses.create(model="gpt-4o-mini", input="hi", background=True, max_output_tokens=50)
        assert queued.status == "queued"
        wait_until(lambda: _reserved(gateway.url, key["id"]) == 0)
        assert _spent(gateway.url, key["id"]) == 0
        wait_until(lambda: sdk.responses.retrieve(queued.id).status == "completed")
        sdk.responses.retrieve(queued.id)  # a later poll charges nothing more
    (row,) = wait_for_rows(database_url, queued.id)
    assert row["cost_usd"] > 0
    wait_until(lambda: _spent(gateway.url, key["id"]) == row["cost_usd"])


def test_worst_case_output_takes_the_request_then_feature_then_model_then_gateway_cap() -> None:
    config = GatewayConfig.model_validate(
        {
            "features": {"short": {"default_max_output_tokens": 100}},
            "limits": {
                "default_max_output_tokens": 2000,
                "default_max_output_tokens_by_model": {"gpt-5": 9000},
            },
        }
    )
    assert worst_case_output({"max_tokens": 7, "n": 3}, config, "short", "gpt-5") == 21
    assert worst_case_output({"max_output_tokens": 7}, config, None, "gpt-5") == 7
    assert worst_case_output({"n": 2}, config, "short", "gpt-5") == 200
    assert worst_case_output({}, config, "other", "gpt-5") == 9000
    assert worst_case_output({"n": True, "max_tokens": False}, config, None, "gpt-4o") == 2000
    assert worst_case_output({}, GatewayConfig(), None, "gpt-4o") == 4096


def test_budgets_unreadable_with_redis_down_are_a_503_not_zeros(
    start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI
) -> None:
    gateway = start_gateway(redis_url="redis://127.0.0.1:1/0")
    _key(gateway.url, budget_daily_usd="1")
    response = httpx.get(gateway.url + "/admin/budgets", headers=MASTER)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "budget_unavailable"
