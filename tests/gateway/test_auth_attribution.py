"""Keys, attribution headers and request ids: what reaches the upstream, the client and the logs."""

from __future__ import annotations

import json
import logging
import re
import time

import httpx
import openai
import pytest

from app.logs import JsonFormatter
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, ThreadedGateway, wait_until

MESSAGES = [{"role": "user", "content": "the secret plan is PROMPT-TEXT-4711"}]


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_gets_only_the_gateway_key_and_no_gateway_headers(
    stream: bool, client: openai.OpenAI, fake: FakeOpenAI
) -> None:
    response = client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=stream,
        extra_headers={
            "X-Feature": "search",
            "X-User-Id": "user-1",
            "X-Request-Id": "client-chosen-id-1",
            "OpenAI-Organization": "org-client",
            "X-Gateway-Debug": "1",
        },
    )
    if stream:
        list(response)  # type: ignore[call-overload]
    headers = fake.requests[0].headers
    assert headers["authorization"] == f"Bearer {fake.api_key}"
    assert MASTER_KEY not in str(headers)
    for name in ("x-feature", "x-user-id", "x-request-id", "openai-organization", "x-gateway-debug"):
        assert name not in headers
    # The SDK's own headers are the client's business and pass through.
    assert headers["x-stainless-lang"] == "python"


def test_request_id_is_accepted_and_returned(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o",
        messages=MESSAGES,
        extra_headers={"X-Request-Id": "trace-abc.123"},  # type: ignore[arg-type]
    )
    assert raw.headers["x-request-id"] == "trace-abc.123"
    assert raw.parse()._request_id == "trace-abc.123"


def test_request_id_is_generated_on_every_response(gateway: ThreadedGateway) -> None:
    seen = []
    for method, path in [("POST", "/v1/chat/completions"), ("GET", "/nowhere"), ("GET", "/healthz")]:
        before_ms = time.time_ns() // 1_000_000
        response = httpx.request(method, gateway.url + path)
        after_ms = time.time_ns() // 1_000_000
        request_id = response.headers["x-request-id"]
        assert re.fullmatch(r"req_[0-9a-f]{32}", request_id)
        # Time-ordered (the usage index's key): the milliseconds of the call first.
        assert before_ms <= int(request_id[4:16], 16) <= after_ms
        seen.append(request_id)
    assert len(set(seen)) == 3


def test_one_json_access_line_per_request_without_prompt_or_key(
    client: openai.OpenAI, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,  # type: ignore[arg-type]
        user="body-user",
        extra_headers={"X-Feature": "summaries", "X-Request-Id": "log-test-1"},
    )
    # The access line is written once the response has ended, on the gateway's thread.
    wait_until(lambda: any(record.name == "gateway.access" for record in caplog.records))
    lines = [JsonFormatter().format(record) for record in caplog.records]
    access = [line for line in lines if '"logger":"gateway.access"' in line]
    assert len(access) == 1
    entry = json.loads(access[0])
    assert entry["request_id"] == "log-test-1"
    assert entry["method"] == "POST"
    assert entry["path"] == "/v1/chat/completions"
    assert entry["status"] == 200
    assert entry["attempts"] == 1
    assert entry["feature"] == "summaries"
    assert entry["user"] == "body-user"
    assert entry["latency_ms"] > 0
    everything = "\n".join(lines)
    assert "PROMPT-TEXT-4711" not in everything
    assert MASTER_KEY not in everything
    assert fake.api_key not in everything


def test_every_log_line_of_a_request_carries_its_id(
    client: openai.OpenAI, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    fake.fail(503, headers={"retry-after-ms": "1"})
    client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, extra_headers={"X-Request-Id": "two-lines"}
    )  # type: ignore[arg-type]
    wait_until(lambda: any(record.name == "gateway.access" for record in caplog.records))
    lines = [JsonFormatter().format(record) for record in caplog.records if record.name.startswith("gateway")]
    assert len(lines) == 2  # the retry, and the access line
    assert all('"request_id":"two-lines"' in line for line in lines)
