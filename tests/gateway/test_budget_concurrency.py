"""Budgets under concurrency, end to end: many calls at once against a key whose daily cap is worth three
calls spend at most the cap, through one gateway process (the in-process ledger) and through two worker
processes sharing Redis. Every call here costs exactly its worst case (the fake reports as many completion
tokens as max_tokens allowed), so the cap holds only if admission reserves that worst case."""

from __future__ import annotations

import concurrent.futures
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import sdk_client
from tests.db import fetch
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, GatewayProcess, ThreadedGateway, wait_until
from tests.limits import REDIS_URL

MASTER = {"authorization": f"Bearer {MASTER_KEY}"}
MAX_TOKENS = 1000
# gpt-4o-mini: $0.15 per 1M prompt tokens, $0.60 per 1M completion tokens.
USAGE = {"prompt_tokens": 10, "completion_tokens": MAX_TOKENS}
CALL_COST = Decimal(10 * 15 + MAX_TOKENS * 60) / 10**8
# Three reservations (prompt estimated from the body's size, plus 1,000 output tokens) fit; four do not.
CAP = Decimal("0.00185")


@pytest.fixture(scope="module")
def slow() -> Iterator[FakeOpenAI]:
    # Each answer takes a while, so the calls are all in flight together.
    with FakeOpenAI(first_token_delay_s=0.3, record_requests=False) as fake:
        yield fake


def _make_capped_key(url: str) -> dict[str, str]:
    response = httpx.post(
        url + "/admin/keys",
        json={"name": f"capped-{uuid.uuid4().hex[:6]}", "budget_daily_usd": str(CAP)},
        headers=MASTER,
    )
    assert response.status_code == 201, response.text
    created: dict[str, str] = response.json()
    return created


def _spend_concurrently(base_url: str, secret: str, concurrency: int) -> list[int]:
    with sdk_client(base_url, api_key=secret, timeout=30) as sdk:

        def call(_: int) -> int:
            try:
                sdk.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": "spend"}],
                    max_tokens=MAX_TOKENS,
                )
            except openai.RateLimitError as exc:
                assert exc.code == "budget_exceeded", exc.message
                return 429
            return 200

        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(call, range(concurrency)))


def _spent_in_rows(database_url: str, key_id: str, calls: int) -> Decimal:
    def rows() -> list[dict[str, object]]:
        return fetch(
            database_url, "SELECT cost_usd, reserved_usd FROM usage_events WHERE api_key_id = $1", key_id
        )

    wait_until(lambda: len(rows()) == calls, timeout=15)
    found = rows()
    # No admitted call cost more than it reserved.
    assert all(Decimal(str(r["cost_usd"])) <= Decimal(str(r["reserved_usd"])) for r in found), found
    return sum((Decimal(str(r["cost_usd"])) for r in found), Decimal(0))


def _check(url: str, database_url: str, key_id: str, statuses: list[int]) -> None:
    admitted = statuses.count(200)
    spent = _spent_in_rows(database_url, key_id, admitted)
    print(f"concurrency {len(statuses)}: {admitted} admitted, spent ${spent} of a ${CAP} cap")
    assert spent == admitted * CALL_COST
    assert spent <= CAP
    assert admitted >= 1
    budgets = httpx.get(url + "/admin/budgets", headers=MASTER).json()["data"]
    (row,) = [r for r in budgets if r["scope"] == f"key:{key_id}" and r["period"] == "day"]
    # Every call has ended, so nothing is held any more: spent is what the rows say.
    wait_until(lambda: Decimal(_budget_row(url, key_id)["reserved_usd"]) == 0)
    assert Decimal(_budget_row(url, key_id)["spent_usd"]) == spent
    assert Decimal(row["cap_usd"]) == CAP


def _budget_row(url: str, key_id: str) -> dict[str, str]:
    budgets = httpx.get(url + "/admin/budgets", headers=MASTER).json()["data"]
    row: dict[str, str] = next(r for r in budgets if r["scope"] == f"key:{key_id}" and r["period"] == "day")
    return row


@pytest.mark.parametrize("ledger", ["in-process", "redis"])
@pytest.mark.parametrize("concurrency", [20, 50])
def test_concurrent_calls_spend_at_most_the_cap_in_one_process(
    concurrency: int,
    ledger: str,
    start_gateway: Callable[..., ThreadedGateway],
    slow: FakeOpenAI,
    database_url: str,
) -> None:
    slow.reset()
    for _ in range(concurrency):
        slow.reply("ok", usage=USAGE)
    gateway = start_gateway(openai_base_url=slow.base_url, redis_url=REDIS_URL if ledger == "redis" else None)
    key = _make_capped_key(gateway.url)
    statuses = _spend_concurrently(gateway.base_url, key["secret"], concurrency)
    _check(gateway.url, database_url, key["id"], statuses)


@pytest.mark.parametrize("concurrency", [20, 50])
def test_concurrent_calls_spend_at_most_the_cap_across_two_workers_sharing_redis(
    concurrency: int, slow: FakeOpenAI, database_url: str, tmp_path: Path
) -> None:
    slow.reset()
    for _ in range(concurrency):
        slow.reply("ok", usage=USAGE)
    env = {"GATEWAY_REDIS_URL": REDIS_URL}
    gateway = GatewayProcess(slow, database_url, tmp_path, env=env, args=("--workers", "2")).start()
    try:
        key = _make_capped_key(gateway.url)
        statuses = _spend_concurrently(gateway.url + "/v1", key["secret"], concurrency)
        _check(gateway.url, database_url, key["id"], statuses)
    finally:
        gateway.stop()


# Legacy completions reach the upstream through the passthrough, which meters their usage: a hold of
# the worst case at admission keeps them under the cap too.
LEGACY_TOKENS = 1000
# gpt-3.5-turbo-instruct: $1.50 per 1M prompt tokens, $2.00 per 1M completion tokens; the fake bills the
# prompt's one word and max_tokens.
LEGACY_CALL_COST = Decimal(1 * 150 + LEGACY_TOKENS * 200) / 10**8


def _complete_concurrently(base_url: str, secret: str, concurrency: int) -> list[int]:
    with sdk_client(base_url, api_key=secret, timeout=30) as sdk:

        def call(_: int) -> int:
            try:
                sdk.completions.create(
                    model="gpt-3.5-turbo-instruct", prompt="spend", max_tokens=LEGACY_TOKENS
                )
            except openai.RateLimitError as exc:
                assert exc.code == "budget_exceeded", exc.message
                return 429
            return 200

        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(call, range(concurrency)))


@pytest.mark.parametrize("ledger", ["in-process", "redis"])
@pytest.mark.parametrize("concurrency", [20, 50])
def test_concurrent_passthrough_calls_spend_at_most_the_cap(
    concurrency: int,
    ledger: str,
    start_gateway: Callable[..., ThreadedGateway],
    slow: FakeOpenAI,
    database_url: str,
) -> None:
    slow.reset()
    slow.slow_first_byte(0.3, times=concurrency)
    gateway = start_gateway(openai_base_url=slow.base_url, redis_url=REDIS_URL if ledger == "redis" else None)
    # Worth three calls' worst case (a prompt estimated from the body's ~70 bytes, 1,000 tokens out).
    cap = Decimal("0.0062")
    response = httpx.post(
        gateway.url + "/admin/keys",
        json={"name": f"capped-{uuid.uuid4().hex[:6]}", "budget_daily_usd": str(cap)},
        headers=MASTER,
    )
    key = response.json()
    statuses = _complete_concurrently(gateway.base_url, key["secret"], concurrency)
    admitted = statuses.count(200)
    print(f"passthrough, concurrency {concurrency}: {admitted} admitted of a ${cap} cap")
    spent = _spent_in_rows(database_url, key["id"], admitted)
    assert admitted == 3
    assert spent == admitted * LEGACY_CALL_COST <= cap
    wait_until(lambda: Decimal(_budget_row(gateway.url, key["id"])["reserved_usd"]) == 0)
    assert Decimal(_budget_row(gateway.url, key["id"])["spent_usd"]) == spent
