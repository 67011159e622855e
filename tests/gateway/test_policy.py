"""Model policy from GATEWAY_CONFIG: aliases, per-feature models, fallbacks, several upstreams, the model
list, start-up validation and SIGHUP reload."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import sdk_client
from tests.db import wait_for_rows
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, GatewayProcess, ThreadedGateway, refused_start, wait_until

MESSAGES = [{"role": "user", "content": "hi"}]
CONFIG = """
aliases:
  fast: gpt-4o-mini
  smart: gpt-4.1
fallbacks:
  gpt-4.1: [gpt-4o, fast]
features:
  support-bot:
    default_model: fast
    allowed_models: [fast, gpt-4o]
"""


@pytest.fixture
def policy_gateway(start_gateway: Callable[..., ThreadedGateway], tmp_path: Path) -> ThreadedGateway:
    path = tmp_path / "gateway.yaml"
    path.write_text(CONFIG)
    return start_gateway(config_file=path)


def test_alias_resolves_and_the_row_keeps_what_was_asked(
    policy_gateway: ThreadedGateway, fake: FakeOpenAI, database_url: str
) -> None:
    request_id = f"alias-{uuid.uuid4().hex}"
    with sdk_client(policy_gateway.base_url) as sdk:
        raw = sdk.chat.completions.with_raw_response.create(
            model="fast",
            messages=MESSAGES,
            extra_headers={"X-Request-Id": request_id},  # type: ignore[arg-type]
        )
    assert fake.requests[0].json["model"] == "gpt-4o-mini"
    assert raw.headers["x-gateway-model"] == "gpt-4o-mini"
    (row,) = wait_for_rows(database_url, request_id)
    assert row["model"] == "fast"
    assert row["upstream_model"] == "gpt-4o-mini-2024-07-18"
    assert row["cost_usd"] is not None
    # The metrics name the model as the row does, with the one that answered beside it.
    metrics = httpx.get(policy_gateway.url + "/metrics").text
    tokens = 'gateway_tokens_total{feature="",kind="prompt",model="fast",upstream_model="gpt-4o-mini"}'
    assert tokens in metrics
    assert 'gateway_cost_usd_total{feature="",model="fast",upstream_model="gpt-4o-mini"}' in metrics


def test_feature_default_model(policy_gateway: ThreadedGateway, fake: FakeOpenAI) -> None:
    response = httpx.post(
        policy_gateway.base_url + "/chat/completions",
        json={"messages": MESSAGES},
        headers={"authorization": f"Bearer {MASTER_KEY}", "x-feature": "support-bot"},
    )
    assert response.status_code == 200
    assert fake.requests[0].json["model"] == "gpt-4o-mini"


def test_disallowed_model_is_403_naming_feature_and_model(
    policy_gateway: ThreadedGateway, fake: FakeOpenAI
) -> None:
    with sdk_client(policy_gateway.base_url) as sdk, pytest.raises(openai.PermissionDeniedError) as caught:
        sdk.chat.completions.create(
            model="gpt-4.1",
            messages=MESSAGES,
            extra_headers={"X-Feature": "support-bot"},  # type: ignore[arg-type]
        )
    assert "support-bot" in caught.value.message
    assert "gpt-4.1" in caught.value.message
    assert caught.value.code == "model_not_allowed"
    assert fake.requests == []


def test_fallback_after_exhausted_429s(
    policy_gateway: ThreadedGateway, fake: FakeOpenAI, database_url: str
) -> None:
    request_id = f"fallback-{uuid.uuid4().hex}"
    fake.fail(429, times=3, headers={"retry-after-ms": "1"})
    with sdk_client(policy_gateway.base_url) as sdk:
        raw = sdk.chat.completions.with_raw_response.create(
            model="smart",
            messages=MESSAGES,
            extra_headers={"X-Request-Id": request_id},  # type: ignore[arg-type]
        )
    assert [r.json["model"] for r in fake.requests] == ["gpt-4.1"] * 3 + ["gpt-4o"]
    assert raw.headers["x-gateway-model"] == "gpt-4o"
    assert raw.headers["x-gateway-attempts"] == "4"
    (row,) = wait_for_rows(database_url, request_id)
    assert row["model"] == "smart"
    assert row["upstream_model"] == "gpt-4o-2024-08-06"
    assert row["attempts"] == 4


def test_fallback_skips_models_the_feature_may_not_use(
    start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI, tmp_path: Path
) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "fallbacks: {gpt-4o: [gpt-4.1, gpt-4o-mini]}\n"
        "features: {f: {allowed_models: [gpt-4o, gpt-4o-mini]}}\n"
    )
    gateway = start_gateway(config_file=path)
    fake.fail(500, times=3, headers={"retry-after-ms": "1"})
    with sdk_client(gateway.base_url) as sdk:
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers={"X-Feature": "f"})  # type: ignore[arg-type]
    assert [r.json["model"] for r in fake.requests] == ["gpt-4o"] * 3 + ["gpt-4o-mini"]


def test_models_list_is_filtered_and_has_aliases(policy_gateway: ThreadedGateway, fake: FakeOpenAI) -> None:
    with sdk_client(policy_gateway.base_url) as sdk:
        everything = {model.id for model in sdk.models.list()}
        for_feature = {model.id for model in sdk.models.list(extra_headers={"X-Feature": "support-bot"})}
        alias = sdk.models.retrieve("fast")
    assert {"gpt-4o", "gpt-4o-mini", "gpt-4.1", "text-embedding-3-small", "fast", "smart"} <= everything
    assert for_feature == {"fast", "gpt-4o-mini", "gpt-4o"}
    assert alias.id == "fast"
    assert alias.owned_by == "alias of gpt-4o-mini"


def test_several_upstreams_serve_models_with_their_own_keys(
    start_gateway: Callable[..., ThreadedGateway],
    fake: FakeOpenAI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with FakeOpenAI(api_key="sk-second-upstream") as second:
        monkeypatch.setenv("SECOND_UPSTREAM_KEY", "sk-second-upstream")
        path = tmp_path / "gateway.yaml"
        path.write_text(
            f"""
upstreams:
  second: {{base_url: "{second.base_url}", api_key_env: SECOND_UPSTREAM_KEY}}
models:
  llama-local: {{upstreams: [{{upstream: second}}]}}
  gpt-4o-mini: {{upstreams: [{{upstream: openai, weight: 1}}, {{upstream: second, weight: 1}}]}}
"""
        )
        gateway = start_gateway(config_file=path)
        with sdk_client(gateway.base_url) as sdk:
            sdk.chat.completions.create(model="llama-local", messages=MESSAGES)  # type: ignore[arg-type]
            assert len(second.requests) == 1 and fake.requests == []
            assert second.requests[0].headers["authorization"] == "Bearer sk-second-upstream"
            for _ in range(40):
                sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
        # Weighted 1:1; both get a share (the chance that one gets none of 40 is 2 in a trillion).
        assert len(fake.requests) > 0
        assert len(second.requests) > 1
        assert len(fake.requests) + len(second.requests) == 41


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("aliases: [1, 2", "not valid YAML at line"),
        ("aliases: {fast: gpt-4o-mini}\nfeaturez: {}", "featurez: Extra inputs are not permitted"),
        ("models: {m: {upstreams: [{upstream: nowhere}]}}", "models.m: unknown upstream 'nowhere'"),
        ("aliases: {a: b, b: c}", "aliases.a: points at another alias"),
        ("prices: {gpt-4o: {input_per_1m: -1, output_per_1m: 1}}", "gpt-4o.input_per_1m"),
        ("features: {f: {allowed_models: fast}}", "features.f.allowed_models"),
    ],
)
def test_bad_config_file_is_rejected_at_startup_with_one_line(text: str, reason: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    line = refused_start({"GATEWAY_CONFIG": str(path)})
    assert line.startswith(f"llm-gateway: GATEWAY_CONFIG ({path}): ")
    assert reason in line


def test_sighup_reloads_the_config_without_dropping_requests(
    fake_server: FakeOpenAI, database_url: str, tmp_path: Path
) -> None:
    fake_server.reset()
    path = tmp_path / "gateway.yaml"
    path.write_text("aliases: {fast: gpt-4o-mini}\n")
    gateway = GatewayProcess(fake_server, database_url, tmp_path, env={"GATEWAY_CONFIG": str(path)}).start()
    try:
        assert gateway.proc is not None
        with sdk_client(gateway.url + "/v1") as sdk:
            sdk.chat.completions.create(model="fast", messages=MESSAGES)  # type: ignore[arg-type]
            assert fake_server.requests[-1].json["model"] == "gpt-4o-mini"
            # A stream in flight across the reload finishes.
            fake_server.reply("one two three four five")
            stream = iter(sdk.chat.completions.create(model="fast", messages=MESSAGES, stream=True))  # type: ignore[arg-type]
            next(stream)
            path.write_text("aliases: {fast: gpt-4.1}\n")
            gateway.proc.send_signal(signal.SIGHUP)

            def routed_to_new_model() -> bool:
                sdk.chat.completions.create(model="fast", messages=MESSAGES)  # type: ignore[arg-type]
                return bool(fake_server.requests[-1].json["model"] == "gpt-4.1")

            wait_until(routed_to_new_model, timeout=10)
            assert "".join(c.choices[0].delta.content or "" for c in stream) == "one two three four five"
            # A broken file on reload keeps the running configuration.
            path.write_text("aliases: [")
            gateway.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "configuration not reloaded" in gateway.log_path.read_text(), timeout=10)
            sdk.chat.completions.create(model="fast", messages=MESSAGES)  # type: ignore[arg-type]
            assert fake_server.requests[-1].json["model"] == "gpt-4.1"
            assert gateway.proc.poll() is None
    finally:
        gateway.stop()
