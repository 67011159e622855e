"""OpenTelemetry traces through a real gateway, exported over OTLP/HTTP to a real receiver in the test
process, with the official SDK as the client."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import sdk_client
from tests.db import wait_for_rows
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.otlp_receiver import CLIENT, ERROR, SERVER, OtlpReceiver
from tests.harness import GatewayProcess, ThreadedGateway, refused_start

PROMPT = "a-secret-prompt-7f3a"
ANSWER = "a-secret-answer-91cd"
MESSAGES = [{"role": "user", "content": PROMPT}]
USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as otlp:
        yield otlp


@pytest.fixture
def traced(
    start_gateway: Callable[..., ThreadedGateway], receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> ThreadedGateway:
    # The SDK exports a batch every 5 s unless told otherwise; the tests need not wait that long.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
    return start_gateway(otel_endpoint=receiver.endpoint)


def _rid() -> str:
    return f"trace-{uuid.uuid4().hex}"


def test_a_call_is_a_genai_span_with_a_child_per_attempt_continuing_the_callers_trace(
    traced: ThreadedGateway, fake: FakeOpenAI, receiver: OtlpReceiver, database_url: str
) -> None:
    fake.fail(503)
    fake.reply(ANSWER, usage=USAGE)
    request_id = _rid()
    with sdk_client(traced.base_url) as sdk:
        sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,  # type: ignore[arg-type]
            extra_headers={
                "X-Request-Id": request_id,
                "X-Feature": "tracing-f",
                "X-User-Id": "user-7",
                "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01",
            },
        )
    (row,) = wait_for_rows(database_url, request_id)
    span = receiver.server_span(request_id)
    assert (span.kind, span.name, span.service) == (SERVER, "chat gpt-4o-mini", "llm-gateway")
    # The caller's trace is continued: same trace, the caller's span as the parent.
    assert (span.trace_id, span.parent_span_id) == (TRACE_ID, PARENT_ID)
    attributes = span.attributes
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.system"] == attributes["gen_ai.provider.name"] == "openai"
    assert attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert attributes["gen_ai.response.model"] == row["upstream_model"] == "gpt-4o-mini-2024-07-18"
    assert attributes["gen_ai.usage.input_tokens"] == 11
    assert attributes["gen_ai.usage.output_tokens"] == 7
    assert attributes["gateway.feature"] == "tracing-f"
    assert attributes["gateway.user_id"] == "user-7"
    assert attributes["gateway.attempts"] == 2
    assert attributes["gateway.cost_usd"] == pytest.approx(float(row["cost_usd"]))
    assert attributes["gateway.request_id"] == row["request_id"]
    assert attributes["http.response.status_code"] == 200
    # One CLIENT span per upstream attempt, the first a 503.
    first, second = receiver.children(span)
    assert (first.kind, second.kind) == (CLIENT, CLIENT)
    assert (first.attributes["http.response.status_code"], first.status) == (503, ERROR)
    assert second.attributes["http.response.status_code"] == 200
    assert [first.attributes["gateway.attempt"], second.attributes["gateway.attempt"]] == [1, 2]
    assert first.attributes["url.full"] == fake.base_url + "/chat/completions"
    assert span.start_ns <= first.start_ns < first.end_ns <= second.start_ns < second.end_ns <= span.end_ns
    # Each attempt told the upstream its own span, in the caller's trace.
    sent = [request.headers["traceparent"] for request in fake.requests]
    assert sent == [f"00-{TRACE_ID}-{first.span_id}-01", f"00-{TRACE_ID}-{second.span_id}-01"]
    # Neither the prompt nor the answer was exported.
    assert not any(PROMPT.encode() in body or ANSWER.encode() in body for body in receiver.bodies)


def test_a_key_id_is_on_the_span(
    traced: ThreadedGateway, fake: FakeOpenAI, receiver: OtlpReceiver, database_url: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "keys", "create", "tracing-key"],
        capture_output=True,
        text=True,
        env={"DATABASE_URL": database_url, "PATH": ""},
        timeout=60,
        check=True,
    )
    secret = next(word for word in result.stdout.split() if word.startswith("sk-gw-"))
    fake.reply(ANSWER, usage=USAGE)
    request_id = _rid()
    with sdk_client(traced.base_url, api_key=secret) as sdk:
        sdk.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers={"X-Request-Id": request_id}
        )
    (row,) = wait_for_rows(database_url, request_id)
    span = receiver.server_span(request_id)
    assert span.attributes["gateway.api_key_id"] == row["api_key_id"] is not None
    # A new trace when the caller sent none.
    assert span.parent_span_id == ""


def test_a_stream_is_one_span_ending_with_the_stream(
    traced: ThreadedGateway, fake: FakeOpenAI, receiver: OtlpReceiver
) -> None:
    fake.reply(ANSWER, chunks=["a-secret-", "answer-", "91cd"], usage=USAGE)
    request_id = _rid()
    with sdk_client(traced.base_url) as sdk:
        stream = sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            extra_headers={"X-Request-Id": request_id},
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == ANSWER
    span = receiver.server_span(request_id)
    assert span.attributes["gateway.stream"] is True
    assert span.attributes["gen_ai.usage.output_tokens"] == 7
    (attempt,) = receiver.children(span)
    # The attempt ends with the answer's head and first bytes; the call's span with the stream.
    assert attempt.end_ns < span.end_ns
    assert not any(b"a-secret-" in body for body in receiver.bodies)


def test_a_stream_the_client_abandons_still_ends_its_span(
    traced: ThreadedGateway, fake: FakeOpenAI, receiver: OtlpReceiver
) -> None:
    fake.reply(ANSWER, chunks=["one ", "two ", "three"], usage=USAGE)
    fake.hang_stream(chunks_before_hang=2)
    request_id = _rid()
    with sdk_client(traced.base_url) as sdk:
        stream = sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            extra_headers={"X-Request-Id": request_id},
        )
        next(iter(stream))
        stream.close()
    span = receiver.server_span(request_id)
    assert span.attributes["gateway.client_disconnected"] is True
    # Counted by the gateway itself (no usage chunk came): the prompt at least.
    assert span.attributes["gen_ai.usage.input_tokens"] > 0
    assert span.start_ns < span.end_ns


def test_an_upstream_that_breaks_a_stream_off_ends_its_span(
    traced: ThreadedGateway, fake: FakeOpenAI, receiver: OtlpReceiver
) -> None:
    fake.reply(ANSWER, chunks=["one ", "two ", "three"], usage=USAGE)
    fake.drop_mid_stream(after_chunks=1)
    request_id = _rid()
    with sdk_client(traced.base_url) as sdk, pytest.raises(openai.APIError):
        stream = sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            extra_headers={"X-Request-Id": request_id},
        )
        for _ in stream:
            pass
    span = receiver.server_span(request_id)
    assert span.attributes["error.type"] == "upstream_stream_broken"
    assert span.status == ERROR


def test_untraced_nothing_of_tracing_is_loaded() -> None:
    """Off (no OTEL_EXPORTER_OTLP_ENDPOINT), the gateway loads neither the tracing module nor the SDK."""
    code = (
        "import sys, asyncio\n"
        "from app.main import create_app\n"
        "app = create_app()\n"
        "assert app.tracing is None\n"
        "prefixes = ('app.tracing', 'opentelemetry.sdk.trace', 'opentelemetry.exporter')\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(prefixes))\n"
        "print(loaded)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"GATEWAY_MASTER_KEY": "sk-test-master-key", "PATH": ""},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_call_off_the_metered_routes_is_named_by_its_route(
    traced: ThreadedGateway, receiver: OtlpReceiver
) -> None:
    request_id = _rid()
    httpx.get(traced.url + "/healthz", headers={"x-request-id": request_id}).raise_for_status()
    span = receiver.server_span(request_id)
    assert span.name == "GET /healthz"
    assert "gen_ai.operation.name" not in span.attributes


def test_an_endpoint_that_is_not_otlp_over_http_stops_start_up_with_one_line() -> None:
    line = refused_start({"OTEL_EXPORTER_OTLP_ENDPOINT": "otel-collector:4317"})
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in line and "http://" in line


def test_a_served_process_exports_its_last_spans_when_it_stops(
    fake_server: FakeOpenAI, receiver: OtlpReceiver, database_url: str, tmp_path: Path
) -> None:
    """`llm-gateway serve` with two workers, each with its own exporter; a SIGTERM flushes them (the
    SDK's default batch delay, 5 s, is longer than the test waits before stopping)."""
    fake_server.reset()
    gateway = GatewayProcess(
        fake_server,
        database_url,
        tmp_path,
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": "gateway-under-test"},
        args=("--workers", "2"),
    ).start()
    request_id = _rid()
    try:
        fake_server.reply(ANSWER, usage=USAGE)
        with sdk_client(gateway.url + "/v1") as sdk:
            sdk.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, extra_headers={"X-Request-Id": request_id}
            )
    finally:
        assert gateway.stop() == 0
    span = receiver.server_span(request_id, timeout=1)
    assert (span.name, span.service) == ("chat gpt-4o-mini", "gateway-under-test")
    assert span.attributes["gen_ai.usage.input_tokens"] == 11


def test_an_upstream_url_is_put_on_a_span_without_its_credentials() -> None:
    from app.tracing import _without_credentials

    assert _without_credentials("https://me:secret@llm.internal:8443/v1/chat/completions") == (
        "https://REDACTED:REDACTED@llm.internal:8443/v1/chat/completions"
    )
    assert _without_credentials("http://127.0.0.1:8000/v1/files?purpose=batch") == (
        "http://127.0.0.1:8000/v1/files?purpose=batch"
    )
