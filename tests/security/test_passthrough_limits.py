"""Passthrough is not a side door: the rate limits of a key, a feature and an end user count every /v1 call,
and a spent budget refuses every call that can cost money, whichever route serves it."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import sdk_client
from tests.fakes.openai_upstream import FakeOpenAI
from tests.gateway.test_keys import create_key
from tests.harness import MASTER_KEY, ThreadedGateway, wait_until
from tests.security import raw_request

MASTER = {"authorization": f"Bearer {MASTER_KEY}"}
MESSAGES: Any = [{"role": "user", "content": "hi"}]
# gpt-4o: 10,000 prompt and 10,000 completion tokens at $2.50 and $10.00 per 1M = $0.125 a call.
EXPENSIVE = {"prompt_tokens": 10_000, "completion_tokens": 10_000}
# The calls that can cost money, each refused by a spent budget before it reaches the upstream.
COSTLY: list[tuple[str, dict[str, Any]]] = [
    ("/v1/completions", {"model": "gpt-4o", "prompt": "hi"}),
    ("/v1/images/generations", {"model": "gpt-image-1", "prompt": "a cat"}),
    ("/v1/audio/speech", {"model": "gpt-4o-mini-tts", "input": "hi", "voice": "alloy"}),
    ("/v1/moderations", {"input": "hi"}),
    ("/v1/batches", {"input_file_id": "file-1", "endpoint": "/v1/chat/completions"}),
    ("/v1/fine_tuning/jobs", {"model": "gpt-4o-mini", "training_file": "file-1"}),
]


def bearer(key: dict[str, Any]) -> dict[str, str]:
    return {"authorization": f"Bearer {key['secret']}"}


def configured(start_gateway: Callable[..., ThreadedGateway], tmp_path: Path, text: str) -> ThreadedGateway:
    path = tmp_path / f"gateway-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(text)
    return start_gateway(config_file=path)


def post(gateway: ThreadedGateway, path: str, body: dict[str, Any], headers: dict[str, str]) -> Any:
    return raw_request(
        gateway.port,
        "POST",
        path,
        headers={**headers, "content-type": "application/json"},
        body=orjson.dumps(body),
    )


def upstream_paths(fake: FakeOpenAI) -> list[str]:
    return [request.path for request in fake.requests]


def spent(gateway: ThreadedGateway, scope: str, period: str, column: str = "spent_usd") -> Decimal:
    rows = httpx.get(gateway.url + "/admin/budgets", headers=MASTER).json()["data"]
    # A user is listed once the recorder has written their first row.
    found = (Decimal(r[column]) for r in rows if (r["scope"], r["period"]) == (scope, period))
    return next(found, Decimal(0))


def reserved(gateway: ThreadedGateway, scope: str, period: str) -> Decimal:
    return spent(gateway, scope, period, "reserved_usd")


def spend_on_chat(gateway: ThreadedGateway, fake: FakeOpenAI, headers: dict[str, str], scope: str) -> None:
    """One metered call that costs $0.125, and wait until the budget's ledger holds it."""
    fake.reply("ok", usage=EXPENSIVE)
    body = {"model": "gpt-4o", "messages": MESSAGES}
    assert post(gateway, "/v1/chat/completions", body, headers).status == 200
    period = "month" if scope.startswith("user:") else "day"
    wait_until(lambda: spent(gateway, scope, period) >= Decimal("0.125"))


def test_rpm_used_up_on_a_metered_route_refuses_passthrough(
    gateway: ThreadedGateway, fake: FakeOpenAI
) -> None:
    limited, other = create_key(gateway, rpm_limit=2), create_key(gateway, rpm_limit=2)
    with sdk_client(gateway.base_url, api_key=limited["secret"]) as sdk:
        for _ in range(2):
            sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError) as caught:
            sdk.models.list()
        assert caught.value.code == "rate_limit_exceeded" and limited["id"] in caught.value.message
        with pytest.raises(openai.RateLimitError):
            sdk.completions.create(model="gpt-4o", prompt="hi")
    refused = raw_request(gateway.port, "GET", "/v1/models/gpt-4o", headers=bearer(limited))
    assert refused.status == 429 and refused.error_code() == "rate_limit_exceeded"
    assert upstream_paths(fake) == ["/v1/chat/completions"] * 2
    # The other key's minute is its own.
    with sdk_client(gateway.base_url, api_key=other["secret"]) as sdk:
        sdk.completions.create(model="gpt-4o", prompt="hi")
    assert upstream_paths(fake)[-1] == "/v1/completions"


def test_rpm_used_up_through_passthrough_refuses_the_metered_routes(
    gateway: ThreadedGateway, fake: FakeOpenAI
) -> None:
    key = create_key(gateway, rpm_limit=3)
    with sdk_client(gateway.base_url, api_key=key["secret"]) as sdk:
        sdk.models.list()
        sdk.completions.create(model="gpt-4o", prompt="hi")
        sdk.moderations.create(input="hi")
        for create in (
            lambda: sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES),
            lambda: sdk.embeddings.create(model="text-embedding-3-small", input="hi"),
            lambda: sdk.responses.create(model="gpt-4o", input="hi"),
        ):
            with pytest.raises(openai.RateLimitError) as caught:
                create()
            assert caught.value.code == "rate_limit_exceeded"
    assert upstream_paths(fake) == ["/v1/models", "/v1/completions", "/v1/moderations"]


def test_feature_and_user_rpm_count_passthrough_calls(
    start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI, tmp_path: Path
) -> None:
    # Names of their own: a gateway starts from this period's spend in the session's database.
    feature, user = f"search-{uuid.uuid4().hex[:6]}", f"u-{uuid.uuid4().hex[:6]}"
    gateway = configured(start_gateway, tmp_path, f"features: {{{feature}: {{rpm: 1}}}}\nusers: {{rpm: 1}}\n")
    for headers, named in (
        ({"x-feature": feature}, f"feature '{feature}'"),
        ({"x-user-id": user}, f"user '{user}'"),
    ):
        first = raw_request(gateway.port, "GET", "/v1/models", headers={**MASTER, **headers})
        assert first.status == 200
        second = raw_request(gateway.port, "GET", "/v1/files/file-1", headers={**MASTER, **headers})
        assert second.status == 429 and second.error_code() == "rate_limit_exceeded"
        assert named in second.json()["error"]["message"]  # type: ignore[index]
    assert upstream_paths(fake) == ["/v1/models"] * 2


def test_spent_key_budget_refuses_every_call_that_can_cost_money(
    gateway: ThreadedGateway, fake: FakeOpenAI
) -> None:
    spender, other = (
        create_key(gateway, budget_daily_usd="0.1", scopes=["*"]),
        create_key(gateway, scopes=["*"]),
    )
    spend_on_chat(gateway, fake, bearer(spender), f"key:{spender['id']}")
    fake.reset()
    for path, body in COSTLY:
        refused = post(gateway, path, body, bearer(spender))
        assert refused.status == 429, (path, refused.body)
        assert refused.error_code() == "budget_exceeded"
        assert refused.headers["x-should-retry"] == "false"
    with sdk_client(gateway.base_url, api_key=spender["secret"]) as sdk:
        with pytest.raises(openai.RateLimitError) as caught:
            sdk.images.generate(model="gpt-image-1", prompt="a cat")
        assert caught.value.code == "budget_exceeded" and spender["id"] in caught.value.message
    assert fake.requests == []
    # What costs nothing is still served: reading and listing (a key reads only its own objects, so
    # lists here; the owner checks are tests/security/test_ownership.py's).
    for path in ("/v1/files", "/v1/models", "/v1/vector_stores"):
        answer = raw_request(gateway.port, "GET", path, headers=bearer(spender))
        assert answer.status == 200, (path, answer.body)
    assert upstream_paths(fake) == ["/v1/files", "/v1/models", "/v1/vector_stores"]
    # Another key's budget is not this one's.
    assert post(gateway, "/v1/completions", COSTLY[0][1], bearer(other)).status == 200


def test_spent_feature_and_user_budgets_refuse_passthrough(
    start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI, tmp_path: Path
) -> None:
    feature, user = f"reports-{uuid.uuid4().hex[:6]}", f"u-{uuid.uuid4().hex[:6]}"
    gateway = configured(
        start_gateway,
        tmp_path,
        f"features: {{{feature}: {{budget_daily_usd: 0.1}}}}\nusers: {{budget_monthly_usd: 0.1}}\n",
    )
    for headers, scope in (
        ({"x-feature": feature}, f"feature:{feature}"),
        ({"x-user-id": user}, f"user:{user}"),
    ):
        spend_on_chat(gateway, fake, {**MASTER, **headers}, scope)
        fake.reset()
        completion = post(gateway, "/v1/completions", COSTLY[0][1], {**MASTER, **headers})
        image = post(gateway, "/v1/images/generations", COSTLY[1][1], {**MASTER, **headers})
        assert (completion.status, image.status) == (429, 429)
        assert completion.error_code() == image.error_code() == "budget_exceeded"
        assert fake.requests == []
        assert (
            raw_request(gateway.port, "GET", "/v1/files/file-x", headers={**MASTER, **headers}).status == 404
        )
        assert upstream_paths(fake) == ["/v1/files/file-x"]
    # Nobody else's budget is spent.
    assert (
        post(gateway, "/v1/completions", COSTLY[0][1], {**MASTER, "x-user-id": user + "-other"}).status == 200
    )


def test_passthrough_cost_is_charged_to_the_budgets(gateway: ThreadedGateway, fake: FakeOpenAI) -> None:
    key = create_key(gateway, budget_daily_usd="0.06")
    # 10,000 prompt tokens of gpt-4o and 100 completion tokens: $0.026, the legacy endpoint metered from
    # its usage. Its worst case (a prompt estimated at 12,500 tokens, 100 out: $0.0323) fits the cap.
    prompt = "word " * 10_000
    body = {"model": "gpt-4o", "prompt": prompt, "max_tokens": 100}
    assert post(gateway, "/v1/completions", body, bearer(key)).status == 200
    wait_until(lambda: spent(gateway, f"key:{key['id']}", "day") >= Decimal("0.026"))
    # A call without max_tokens may produce the default 4,096 tokens ($0.041): more than is left.
    refused = post(gateway, "/v1/completions", {"model": "gpt-4o", "prompt": "hi"}, bearer(key))
    assert refused.status == 429 and refused.error_code() == "budget_exceeded"
    # Nor does the same call hold its worst case twice: with max_tokens it fits.
    body = {"model": "gpt-4o", "prompt": "hi", "max_tokens": 100}
    assert post(gateway, "/v1/completions", body, bearer(key)).status == 200
    assert upstream_paths(fake) == ["/v1/completions", "/v1/completions"]
    # Every call has ended: nothing is held.
    wait_until(lambda: reserved(gateway, f"key:{key['id']}", "day") == 0)
