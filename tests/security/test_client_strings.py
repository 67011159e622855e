"""Client strings that land in a usage row are bounded where they come in, so that no call is answered
and then lost because the database refuses its row; and a row it does refuse is counted in /metrics."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.db import wait_for_rows
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, ThreadedGateway, wait_until
from tests.security import raw_request

AUTH = {"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"}


def _chat(model: str) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})


@pytest.mark.parametrize(
    "model",
    [secrets.token_urlsafe(7500), "m" * 257, "gpt-4o\x00", "gpt-4o\n"],
    ids=["10KB-random", "257-chars", "NUL", "newline"],
)
@pytest.mark.parametrize("target", ["/v1/chat/completions", "/v1/embeddings", "/v1/responses"])
def test_a_model_no_row_can_hold_is_refused_400(
    gateway: ThreadedGateway, fake: FakeOpenAI, model: str, target: str
) -> None:
    body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "input": "hi"})
    response = raw_request(gateway.port, "POST", target, headers=AUTH, body=body)
    assert response.status == 400, response.body
    assert response.json()["error"]["param"] == "model"  # type: ignore[index]
    assert fake.requests == []


def test_a_model_of_256_characters_is_metered_and_257_refused(
    gateway: ThreadedGateway, fake: FakeOpenAI, database_url: str
) -> None:
    headers = {**AUTH, "X-Request-Id": "model-256"}
    refused = raw_request(
        gateway.port, "POST", "/v1/chat/completions", headers=headers, body=_chat("m" * 257)
    )
    assert refused.status == 400, refused.body
    response = raw_request(
        gateway.port, "POST", "/v1/chat/completions", headers=headers, body=_chat("m" * 256)
    )
    assert response.status == 200, response.body
    (row,) = wait_for_rows(database_url, "model-256")
    assert row["model"] == "m" * 256


def test_a_passthrough_call_with_an_unbounded_model_still_gets_its_row(
    gateway: ThreadedGateway, fake: FakeOpenAI, database_url: str
) -> None:
    """The passthrough learns the model after the call was answered: the row leaves the name out rather
    than being refused by the database."""
    request_id = "passthrough-long-model"
    body = orjson.dumps({"model": secrets.token_urlsafe(7500), "prompt": "one two three"})
    response = raw_request(
        gateway.port, "POST", "/v1/completions", headers={**AUTH, "X-Request-Id": request_id}, body=body
    )
    assert response.status == 200, response.body
    (row,) = wait_for_rows(database_url, request_id)
    assert row["model"] is None
    assert row["endpoint"] == "/v1/completions"
    assert row["prompt_tokens"] == 3


def _metric(gateway: ThreadedGateway, name: str) -> float | None:
    text = httpx.get(gateway.url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None


def test_rows_the_database_refuses_are_counted_in_metrics(
    start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI, database_url: str
) -> None:
    """A hostile upstream's token count past bigint: the row is refused, kept in rejected.jsonl, and
    counted."""
    gateway = start_gateway()
    assert _metric(gateway, "gateway_recorder_events_rejected_total") == 0
    huge = 2**63
    fake.reply("hi", usage={"prompt_tokens": huge, "completion_tokens": 1, "total_tokens": huge + 1})
    response = raw_request(
        gateway.port,
        "POST",
        "/v1/chat/completions",
        headers={**AUTH, "X-Request-Id": "refused-row"},
        body=_chat("no-price-model"),
    )
    assert response.status == 200, response.body
    wait_until(lambda: _metric(gateway, "gateway_recorder_events_rejected_total") == 1)
    rejected = gateway.settings.data_dir.glob("**/rejected*")
    assert any(b"refused-row" in path.read_bytes() for path in rejected)
