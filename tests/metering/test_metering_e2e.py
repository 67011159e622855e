"""Every call through the gateway lands in usage_events exactly once, with exact tokens and cost."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from app.main import reload_config
from app.metering import tokens
from tests.conftest import sdk_client
from tests.db import fetch, usage_rows, wait_for_rows
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, ThreadedGateway, wait_until

MESSAGES = [{"role": "user", "content": "Say hello"}]
USAGE = {
    "prompt_tokens": 31,
    "completion_tokens": 9,
    "total_tokens": 40,
    "prompt_tokens_details": {"cached_tokens": 12},
    "completion_tokens_details": {"reasoning_tokens": 3},
}
# gpt-4o-mini: $0.15 input, $0.075 cached input, $0.60 output per 1M tokens;
# (31 - 12) * 0.15 + 12 * 0.075 + 9 * 0.60 = 9.15 per 1M.
USAGE_COST = Decimal("0.0000091500")


def rid() -> str:
    return f"test-{uuid.uuid4().hex}"


def test_json_call_lands_with_exact_tokens_and_cost(
    client: openai.OpenAI, fake: FakeOpenAI, database_url: str
) -> None:
    request_id = rid()
    fake.reply("Hi!", usage=USAGE)
    client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,  # type: ignore[arg-type]
        extra_headers={"X-Request-Id": request_id, "X-Feature": "support", "X-User-Id": "user-9"},
    )
    (row,) = wait_for_rows(database_url, request_id)
    assert row["feature"] == "support"
    assert row["user_id"] == "user-9"
    assert row["endpoint"] == "/v1/chat/completions"
    assert row["model"] == "gpt-4o-mini"
    assert row["upstream_model"] == "gpt-4o-mini-2024-07-18"
    assert row["stream"] is False
    assert row["status_code"] == 200
    assert row["attempts"] == 1
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (31, 9, 40)
    assert (row["cached_tokens"], row["reasoning_tokens"]) == (12, 3)
    assert row["usage_source"] == "upstream"
    assert row["cost_usd"] == USAGE_COST
    assert row["latency_ms"] >= 0
    assert row["ttfb_ms"] is not None
    assert row["error_type"] is None
    assert row["api_key_id"] is None


@pytest.mark.parametrize("client_wants_usage", [False, True])
def test_stream_lands_with_the_usage_the_gateway_asked_for(
    client_wants_usage: bool, client: openai.OpenAI, fake: FakeOpenAI, database_url: str
) -> None:
    request_id = rid()
    fake.reply("one two three", usage=USAGE)
    options = {"stream_options": {"include_usage": True}} if client_wants_usage else {}
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=True,
        extra_headers={"X-Request-Id": request_id},
        **options,  # type: ignore[arg-type]
    )
    list(stream)
    (row,) = wait_for_rows(database_url, request_id)
    assert row["stream"] is True
    assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]) == (31, 9, 12)
    assert row["usage_source"] == "upstream"
    assert row["cost_usd"] == USAGE_COST
    assert row["ttfb_ms"] is not None and row["ttfb_ms"] <= row["latency_ms"]


def test_stream_without_upstream_usage_is_counted_by_the_gateway(
    client: openai.OpenAI, fake: FakeOpenAI, database_url: str
) -> None:
    request_id = rid()
    fake.reply("Hello world", stream_usage=False)
    list(
        client.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            stream=True,
            extra_headers={"X-Request-Id": request_id},  # type: ignore[arg-type]
        )
    )
    (row,) = wait_for_rows(database_url, request_id)
    # o200k_base: "Say hello" is 2 tokens, + 3 per message + 1 for the role + 3 to prime the reply;
    # "Hello world" is 2 tokens.
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (9, 2, 11)
    assert row["usage_source"] == "estimated"
    # gpt-4o: 9 * 2.50 + 2 * 10.00 per 1M.
    assert row["cost_usd"] == Decimal("0.0000425000")


def test_client_disconnect_mid_stream_still_gives_one_row(
    client: openai.OpenAI, fake: FakeOpenAI, database_url: str
) -> None:
    request_id = rid()
    fake.reply("alpha beta gamma delta epsilon")
    fake.hang_stream(chunks_before_hang=3)
    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        extra_headers={"X-Request-Id": request_id},  # type: ignore[arg-type]
    )
    chunks = iter(stream)
    # All three chunks the upstream sent before it went silent (the role chunk, "alpha", " beta"): once
    # the client has read them the gateway has relayed them, whatever the timing of its disconnect.
    assert [chunk.choices[0].delta.content for chunk in (next(chunks), next(chunks), next(chunks))] == [
        "",
        "alpha",
        " beta",
    ]
    stream.close()
    fake.wait_for(lambda request: request.disconnected)
    (row,) = wait_for_rows(database_url, request_id)
    assert row["usage_source"] == "estimated"
    assert row["prompt_tokens"] == 9
    assert row["completion_tokens"] == 2
    assert row["status_code"] == 200


def test_a_long_stream_broken_off_before_its_usage_is_counted_from_every_relayed_delta(
    client: openai.OpenAI, fake: FakeOpenAI, database_url: str
) -> None:
    """The relay leaves ordinary chunks unparsed while their usage may still come, and parses them once
    that is no longer so, or once they pass its memory bound (64 KiB: ~200 KiB of chunks here)."""
    request_id = rid()
    fake.reply(chunks=[f" w{i}" for i in range(1500)])
    fake.drop_mid_stream(after_chunks=1200)
    stream = client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=True,
        extra_headers={"X-Request-Id": request_id},  # type: ignore[arg-type]
    )
    relayed: list[str] = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            relayed.extend(c.delta.content or "" for c in chunk.choices)
    assert len(relayed) > 1000
    (row,) = wait_for_rows(database_url, request_id)
    assert row["usage_source"] == "estimated"
    assert row["completion_tokens"] == tokens.count_text("gpt-4o", "".join(relayed))
    assert row["error_type"] == "upstream_stream_incomplete" or row["error_type"] == "upstream_stream_broken"


def test_two_calls_sent_with_the_same_request_id_both_land(
    client: openai.OpenAI, fake: FakeOpenAI, database_url: str
) -> None:
    """A client may reuse its X-Request-Id (on its own retries, say): each call is billed, so each gets a
    row under a gateway request_id of its own, both carrying the client's id and counted in usage_daily."""
    request_id, feature = rid(), f"reuse-{uuid.uuid4().hex[:8]}"
    echoed = []
    for _ in range(2):
        fake.reply("Hi!", usage=USAGE)
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=MESSAGES,  # type: ignore[arg-type]
            extra_headers={"X-Request-Id": request_id, "X-Feature": feature},  # type: ignore[arg-type]
        )
        echoed.append(raw.headers["x-request-id"])
    assert echoed == [request_id, request_id]
    rows = wait_until(lambda: rows if len(rows := usage_rows(database_url, request_id)) == 2 else None)
    assert [row["client_request_id"] for row in rows] == [request_id, request_id]
    assert len({row["request_id"] for row in rows}) == 2
    assert all(row["request_id"].startswith("req_") for row in rows)
    (daily,) = fetch(
        database_url,
        "SELECT sum(requests) AS n, sum(prompt_tokens) AS p FROM usage_daily WHERE feature = $1",
        feature,
    )
    assert (daily["n"], daily["p"]) == (2, 2 * USAGE["prompt_tokens"])


def test_retries_give_one_row_with_the_attempts(
    client: openai.OpenAI, fake: FakeOpenAI, database_url: str
) -> None:
    request_id = rid()
    fake.fail(503, times=2, headers={"retry-after-ms": "1"})
    fake.reply("third time lucky", usage=USAGE)
    client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, extra_headers={"X-Request-Id": request_id}
    )  # type: ignore[arg-type]
    (row,) = wait_for_rows(database_url, request_id)
    assert row["attempts"] == 3
    assert row["prompt_tokens"] == 31


def test_failed_call_gets_a_row_with_its_status_and_error(
    client: openai.OpenAI, fake: FakeOpenAI, database_url: str
) -> None:
    request_id = rid()
    fake.fail(429, times=3, headers={"retry-after-ms": "1"})
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_headers={"X-Request-Id": request_id}
        )  # type: ignore[arg-type]
    (row,) = wait_for_rows(database_url, request_id)
    assert row["status_code"] == 429
    assert row["attempts"] == 3
    assert row["error_type"] == "rate_limit_exceeded"
    assert (row["prompt_tokens"], row["completion_tokens"], row["cost_usd"]) == (0, 0, Decimal(0))


def test_bad_input_leaves_no_row(gateway: ThreadedGateway, database_url: str, fake: FakeOpenAI) -> None:
    request_id = rid()
    response = httpx.post(
        gateway.base_url + "/chat/completions",
        json={"model": "gpt-4o"},
        headers={"authorization": f"Bearer {MASTER_KEY}", "x-request-id": request_id},
    )
    assert response.status_code == 400
    # A later metered call is written, so the recorder has flushed past the bad one.
    marker = rid()
    httpx.post(
        gateway.base_url + "/chat/completions",
        json={"model": "gpt-4o", "messages": MESSAGES},
        headers={"authorization": f"Bearer {MASTER_KEY}", "x-request-id": marker},
    )
    wait_for_rows(database_url, marker)
    assert usage_rows(database_url, request_id) == []


def test_unknown_model_costs_null_and_is_counted(
    gateway: ThreadedGateway, client: openai.OpenAI, fake: FakeOpenAI, database_url: str
) -> None:
    def unknown_calls() -> float:
        metrics = httpx.get(gateway.url + "/metrics").text
        assert "my-finetune-xyz" not in metrics
        # A model neither priced nor configured is counted under `other`: clients choose model names.
        line = 'gateway_unknown_model_calls_total{model="other"} '
        return next((float(x.removeprefix(line)) for x in metrics.splitlines() if x.startswith(line)), 0.0)

    before = unknown_calls()
    request_id = rid()
    client.chat.completions.create(
        model="my-finetune-xyz",
        messages=MESSAGES,
        extra_headers={"X-Request-Id": request_id},  # type: ignore[arg-type]
    )
    (row,) = wait_for_rows(database_url, request_id)
    assert row["cost_usd"] is None
    assert row["prompt_tokens"] > 0
    assert row["model"] == "my-finetune-xyz"
    assert unknown_calls() == before + 1


def test_metrics_expose_requests_tokens_cost_and_recorder(
    gateway: ThreadedGateway, client: openai.OpenAI, fake: FakeOpenAI, database_url: str
) -> None:
    request_id = rid()
    fake.reply("x", usage=USAGE)
    client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        extra_headers={"X-Request-Id": request_id, "X-Feature": "metrics-f"},  # type: ignore[arg-type]
    )
    wait_for_rows(database_url, request_id)
    text = wait_until(lambda: (t := httpx.get(gateway.url + "/metrics").text) and "metrics-f" in t and t)
    for name in (
        'gateway_requests_total{route="/v1/chat/completions",status="200"}',
        "gateway_request_duration_seconds_bucket",
        "gateway_time_to_first_byte_seconds_bucket",
        "gateway_upstream_attempts_total",
        # The dated snapshot that answered counts under the price table's entry for it.
        'gateway_tokens_total{feature="metrics-f",kind="prompt",model="gpt-4o-mini",'
        'upstream_model="gpt-4o-mini"} 31.0',
        'gateway_tokens_total{feature="metrics-f",kind="cached",model="gpt-4o-mini",'
        'upstream_model="gpt-4o-mini"} 12.0',
        'gateway_cost_usd_total{feature="metrics-f",model="gpt-4o-mini",upstream_model="gpt-4o-mini"}',
        "gateway_recorder_queue_depth",
        "gateway_recorder_spool_events",
        "gateway_recorder_spool_bytes",
        "gateway_recorder_db_write_errors_total",
        "gateway_recorder_events_spooled_total",
    ):
        assert name in text, name


# A feature with a prompt budget: the gateway counts its chat prompts itself.
PROMPT_BUDGET = "features:\n  support:\n    max_prompt_tokens: 100\n"


@pytest.fixture
def no_tokenizers() -> None:
    """As in a new process: no tokenizer built yet (later tests build them again when they need them)."""
    tokens._build_encoding.cache_clear()
    tokens.get_encoding.cache_clear()
    tokens._built.clear()


@pytest.mark.usefixtures("no_tokenizers")
def test_a_tokenizer_is_built_when_a_call_first_needs_counting_not_at_start_up(
    start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI, database_url: str
) -> None:
    """Each costs ~25-50 MB for the life of the process, and answers with usage need none."""
    gateway = start_gateway()
    assert not tokens.is_built_for("gpt-4o")
    request_id = rid()
    fake.reply("Hello world", stream_usage=False)
    with sdk_client(gateway.base_url) as client:
        stream = client.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            extra_headers={"X-Request-Id": request_id},
        )
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream) == "Hello world"
    # Metered once the tokenizer is built, with the same count as from a tokenizer built beforehand.
    (row,) = wait_for_rows(database_url, request_id)
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (9, 2, 11)
    assert row["usage_source"] == "estimated"
    assert tokens.is_built_for("gpt-4o")
    # Only the encoding that call needed (gpt-4 counts with cl100k_base).
    assert not tokens.is_built_for("gpt-4")


@pytest.mark.usefixtures("no_tokenizers")
def test_prompt_budgets_build_the_tokenizers_at_start_up(
    start_gateway: Callable[..., ThreadedGateway], tmp_path: Path
) -> None:
    """A prompt budget counts prompts on the request path, which must not wait for a tokenizer."""
    config = tmp_path / "gateway.yaml"
    config.write_text(PROMPT_BUDGET)
    start_gateway(config_file=config)
    assert tokens.is_built_for("gpt-4o") and tokens.is_built_for("gpt-4")


@pytest.mark.usefixtures("no_tokenizers")
def test_a_reload_that_adds_a_prompt_budget_builds_the_tokenizers(
    start_gateway: Callable[..., ThreadedGateway], tmp_path: Path
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("features:\n  support:\n    default_model: gpt-4o\n")
    gateway = start_gateway(config_file=config)
    assert not tokens.is_built_for("gpt-4o")
    config.write_text(PROMPT_BUDGET)
    reload_config(gateway.app.services)
    wait_until(lambda: tokens.is_built_for("gpt-4o") and tokens.is_built_for("gpt-4"), timeout=30)


def test_a_call_in_flight_across_a_reload_keeps_the_prices_it_was_admitted_under(
    start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI, database_url: str, tmp_path: Path
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("prices:\n  acme-model: {input_per_1m: 1, output_per_1m: 10}\n")
    gateway = start_gateway(config_file=config)
    usage = {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100}
    before, after = rid(), rid()

    def ask(request_id: str) -> None:
        with sdk_client(gateway.base_url) as sdk:
            sdk.chat.completions.create(
                model="acme-model",
                messages=MESSAGES,  # type: ignore[arg-type]
                extra_headers={"X-Request-Id": request_id},
            )

    fake.slow_first_byte(3.0)
    fake.reply("Hi!", usage=usage, model="acme-model")
    fake.reply("Hi!", usage=usage, model="acme-model")
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(ask, before)
        fake.wait_for_requests(1)
        config.write_text("prices:\n  acme-model: {input_per_1m: 2, output_per_1m: 20}\n")
        reload_config(gateway.app.services)
        assert not in_flight.done(), "the reload landed after the call, not while it was in flight"
        in_flight.result(timeout=30)
    ask(after)
    # 1000 x $1 + 100 x $10 per 1M at the rates it started with; twice that for the call after the reload.
    rows = wait_for_rows(database_url, before, after)
    assert {row["client_request_id"]: row["cost_usd"] for row in rows} == {
        before: Decimal("0.002"),
        after: Decimal("0.004"),
    }
