"""The retry policy, seen from the client (the SDK with max_retries=0) and counted at the fake upstream."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import openai
import pytest

from app.proxy.retry_policy import retry_after_s
from tests.conftest import sdk_client
from tests.db import wait_for_rows
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import ThreadedGateway, free_port

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
def test_retryable_statuses_are_retried(status: int, client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.fail(status, times=2, headers={"retry-after-ms": "5"})
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-gateway-attempts"] == "3"
    assert len(fake.requests) == 3


@pytest.mark.parametrize(
    ("status", "exception"),
    [
        (400, openai.BadRequestError),
        (403, openai.PermissionDeniedError),
        (404, openai.NotFoundError),
        (422, openai.UnprocessableEntityError),
    ],
)
def test_client_errors_are_relayed_without_retry(
    status: int, exception: type[openai.APIStatusError], client: openai.OpenAI, fake: FakeOpenAI
) -> None:
    fake.fail(
        status,
        body={
            "error": {
                "message": "upstream says no",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "nope",
            }
        },
    )
    with pytest.raises(exception) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.status_code == status
    assert caught.value.message.endswith("upstream says no")
    assert caught.value.param == "messages"
    assert caught.value.code == "nope"
    assert caught.value.response.headers["x-gateway-attempts"] == "1"
    assert len(fake.requests) == 1


_BILLED = {
    "id": "chatcmpl-billed",
    "object": "chat.completion",
    "created": 1,
    "model": "gpt-4o",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "billed once"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
}
_BILLED_EVENTS = (
    b'data: {"id":"chatcmpl-billed","object":"chat.completion.chunk","created":1,"model":"gpt-4o",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"billed once"},"finish_reason":"stop"}],'
    b'"usage":null}\n\n'
    b'data: {"id":"chatcmpl-billed","object":"chat.completion.chunk","created":1,"model":"gpt-4o",'
    b'"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}\n\n'
    b"data: [DONE]\n\n"
)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_success_is_not_retried_whatever_its_headers_say(
    stream: bool, client: openai.OpenAI, fake: FakeOpenAI, database_url: str
) -> None:
    """openai-python asks `x-should-retry` only of an error. A success is the answer, and billed: tried
    again, the call would run and be billed twice, and the answer the client got would not be the one
    metered."""
    if stream:
        headers = {"Content-Type": "text/event-stream", "x-should-retry": "true"}
        fake.fail(200, body=_BILLED_EVENTS, headers=headers)
    else:
        fake.fail(200, body=_BILLED, headers={"x-should-retry": "true"})
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MESSAGES, stream=stream, extra_headers={"X-Request-Id": f"billed-{stream}"}
    )
    if stream:
        text = "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices)
    else:
        text = raw.parse().choices[0].message.content
    assert text == "billed once"
    assert raw.headers["x-gateway-attempts"] == "1"
    assert len(fake.requests) == 1
    (row,) = wait_for_rows(database_url, f"billed-{stream}")
    assert (row["prompt_tokens"], row["completion_tokens"], row["attempts"]) == (5, 2, 1)


def test_upstream_401_is_the_gateways_fault_not_the_callers(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.fail(401)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert "OPENAI_API_KEY" in caught.value.message
    assert len(fake.requests) == 1


def test_exhausted_retries_relay_status_body_and_rate_limit_headers(
    client: openai.OpenAI, fake: FakeOpenAI
) -> None:
    fake.fail(429, times=3, headers={"retry-after-ms": "5", "x-ratelimit-remaining-requests": "0"})
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    headers = caught.value.response.headers
    assert headers["x-gateway-attempts"] == "3"
    assert headers["retry-after-ms"] == "5"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-should-retry"] == "false"
    assert caught.value.code == "rate_limit_exceeded"
    assert len(fake.requests) == 3


def test_sdk_retries_do_not_multiply_the_gateways(gateway: ThreadedGateway, fake: FakeOpenAI) -> None:
    fake.fail(503, times=10, headers={"retry-after-ms": "5"})
    with sdk_client(gateway.base_url, max_retries=2) as sdk, pytest.raises(openai.InternalServerError):
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert len(fake.requests) == 3


def test_retry_after_seconds_is_honoured(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.fail(429, headers={"retry-after": "1"})
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    first, second = fake.requests
    assert second.received_at - first.received_at >= 0.95


def test_retry_after_is_capped(start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI) -> None:
    gateway = start_gateway(retry_after_max_s=0.05)
    fake.fail(429, headers={"retry-after": "3600"})
    with sdk_client(gateway.base_url) as sdk:
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    first, second = fake.requests
    assert second.received_at - first.received_at < 5


def test_retry_after_forms() -> None:
    now = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
    in_three = format_datetime(now + timedelta(seconds=3), usegmt=True)
    assert retry_after_s({"retry-after-ms": "250"}) == 0.25
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_s({"retry-after": "2"}) == 2.0
    assert retry_after_s({"retry-after": in_three}, now=now.timestamp()) == pytest.approx(3.0)
    assert retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({}) is None


def test_deadline_stops_new_attempts(start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI) -> None:
    gateway = start_gateway(max_attempts=20, retry_deadline_s=0.5)
    fake.fail(500, times=20, headers={"retry-after-ms": "200"})
    with sdk_client(gateway.base_url) as sdk, pytest.raises(openai.InternalServerError):
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert 2 <= len(fake.requests) <= 4


def test_connection_drop_before_first_byte_is_retried(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.drop_connection()
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    assert raw.headers["x-gateway-attempts"] == "2"
    assert len(fake.requests) == 2


def test_stream_failing_before_its_first_byte_is_retried(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.drop_connection()
    fake.drop_mid_stream(after_chunks=0)
    # The broken-off attempt takes the first scripted reply; the retry answers with the second.
    fake.reply("never seen")
    fake.reply("after two failures")
    stream = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text == "after two failures"
    assert len(fake.requests) == 3


def test_slow_first_byte_times_out_without_a_resend(
    start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI
) -> None:
    # The request went out whole: the upstream may be generating the answer still, so sending it again
    # would run (and bill) it twice.
    gateway = start_gateway(stream_read_timeout_s=0.3)
    fake.slow_first_byte(2.0)
    with sdk_client(gateway.base_url) as sdk, pytest.raises(openai.APIStatusError) as caught:
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    assert caught.value.status_code == 504
    assert caught.value.response.headers["x-gateway-attempts"] == "1"
    assert len(fake.requests) == 1


def test_a_non_streamed_call_may_wait_longer_than_a_streams_read_gap(
    start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI
) -> None:
    # A reasoning model can think for minutes before a non-streamed answer: only the request timeout
    # bounds it, not the gap allowed between a stream's reads.
    gateway = start_gateway(stream_read_timeout_s=0.3, request_timeout_s=10)
    fake.slow_first_byte(1.0)
    with sdk_client(gateway.base_url) as sdk:
        raw = sdk.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-gateway-attempts"] == "1"


def test_upstream_timeout_is_504(start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI) -> None:
    gateway = start_gateway(request_timeout_s=0.2, max_attempts=2)
    fake.slow_first_byte(2.0, times=2)
    with sdk_client(gateway.base_url) as sdk, pytest.raises(openai.APIStatusError) as caught:
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.status_code == 504
    assert caught.value.response.headers["x-gateway-attempts"] == "1"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert caught.value.body is not None


def test_upstream_unreachable_is_502(start_gateway: Callable[..., ThreadedGateway]) -> None:
    gateway = start_gateway(openai_base_url=f"http://127.0.0.1:{free_port()}/v1", max_attempts=2)
    with sdk_client(gateway.base_url) as sdk, pytest.raises(openai.InternalServerError) as caught:
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_connect"
    assert caught.value.response.headers["x-gateway-attempts"] == "2"
