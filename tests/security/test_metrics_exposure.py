"""/metrics: behind GATEWAY_METRICS_KEY when one is set, and label sets that clients cannot grow (features
and models they make up count under `other`)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, ThreadedGateway, wait_until
from tests.security import raw_request

METRICS_KEY = "sk-metrics-scrape-0001"
MASTER = {"Authorization": f"Bearer {MASTER_KEY}"}


def test_a_scrape_needs_the_metrics_key_when_one_is_set(
    start_gateway: Callable[..., ThreadedGateway], gateway: ThreadedGateway, fake: FakeOpenAI
) -> None:
    guarded = start_gateway(metrics_key=METRICS_KEY)
    created = httpx.post(guarded.url + "/admin/keys", json={"name": "app"}, headers=MASTER)
    assert created.status_code == 201, created.text
    gateway_key = created.json()["secret"]
    for authorization in (None, "Bearer wrong-key-0000", f"Bearer {gateway_key}", f"Basic {METRICS_KEY}"):
        headers = {"Authorization": authorization} if authorization else {}
        refused = raw_request(guarded.port, "GET", "/metrics", headers=headers)
        assert refused.status == 401, (authorization, refused.body)
        assert refused.error_code() == "invalid_api_key"
        assert refused.headers["www-authenticate"] == "Bearer"
        assert b"gateway_" not in refused.body
    # The scraper's key, and the master key, which may read all usage anyway.
    for key in (METRICS_KEY, MASTER_KEY):
        scraped = raw_request(guarded.port, "GET", "/metrics", headers={"Authorization": f"Bearer {key}"})
        assert scraped.status == 200
        assert b"gateway_requests_total" in scraped.body
    # Without the setting, /metrics stays open, as before.
    assert raw_request(gateway.port, "GET", "/metrics").status == 200


CONFIG = """
features: {support: {}, search: {allowed_models: [fast, my-llama]}}
aliases: {fast: gpt-4o-mini}
models: {my-llama: {upstreams: [{upstream: openai}]}}
"""


def _label_values(text: str, family: str, label: str) -> set[str]:
    return {
        sample.labels[label]
        for metric in text_string_to_metric_families(text)
        if metric.name == family
        for sample in metric.samples
    }


def test_made_up_features_and_models_count_under_other(
    start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI, tmp_path: Path
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(CONFIG)
    gateway = start_gateway(config_file=config, metrics_max_features=3)
    junk = [uuid.uuid4().hex for _ in range(40)]
    calls = [(f"made-up-{i}-{value}", f"model-{value}") for i, value in enumerate(junk)]
    # After the flood: the configured features and models keep labels of their own.
    calls += [("support", "fast"), ("search", "my-llama"), ("support", "gpt-4o-2024-08-06")]
    with httpx.Client(base_url=gateway.base_url, headers=MASTER) as client:
        for feature, model in calls:
            answer = client.post(
                "/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
                headers={"X-Feature": feature},
            )
            assert answer.status_code == 200, answer.text

    def scraped() -> str | None:
        text = httpx.get(gateway.url + "/metrics").text
        return text if 'feature="search"' in text else None

    text = wait_until(scraped)
    first_three = {feature for feature, _ in calls[:3]}
    assert _label_values(text, "gateway_tokens", "feature") == {*first_three, "other", "support", "search"}
    # Known models by the price table's entry (a dated snapshot counts under its model), configured ones
    # (the alias asked for) by name, and every made-up one under `other`; the same for the model that
    # answered (the alias's target).
    assert _label_values(text, "gateway_tokens", "model") == {"other", "fast", "gpt-4o", "my-llama"}
    answered = _label_values(text, "gateway_tokens", "upstream_model")
    assert answered == {"other", "gpt-4o-mini", "gpt-4o", "my-llama"}
    assert _label_values(text, "gateway_unknown_model_calls", "model") == {"other", "my-llama"}
    assert [line for line in text.splitlines() if any(value in line for value in junk[3:])] == []
    assert 'model="model-' not in text
