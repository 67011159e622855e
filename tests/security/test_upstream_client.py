"""A hostile or broken upstream: what the gateway sends it again, where it lets it send the gateway, how
long it waits for it and how much of its answer it holds. What reached the upstream is read from the fake's
own request log."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import sdk_client
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, ThreadedGateway
from tests.security import RawResponse, raw_request

MESSAGES = [{"role": "user", "content": "hi"}]
CHAT: dict[str, Any] = {"model": "gpt-4o", "messages": MESSAGES}
STREAM: dict[str, Any] = {**CHAT, "stream": True}
# (path, body): a metered JSON call read whole, a stream, and a passthrough POST.
CALLS = {
    "chat": ("/v1/chat/completions", CHAT),
    "stream": ("/v1/chat/completions", STREAM),
    "embeddings": ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"}),
    "passthrough": ("/v1/moderations", {"model": "omni-moderation-latest", "input": "hi"}),
}
BOUNDARY = "gateway-test-boundary"


def post(gateway: ThreadedGateway, path: str, body: dict[str, Any]) -> RawResponse:
    return raw_request(
        gateway.port,
        "POST",
        path,
        headers={"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"},
        body=orjson.dumps(body),
        timeout=15,
    )


def chunked_upload() -> Iterator[bytes]:
    """A multipart file upload sent without a Content-Length, as the gateway passes it on: a stream it
    cannot replay."""
    yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'.encode()
    yield (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    yield b'{"custom_id": "1"}\n' * 100
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def upload(gateway: ThreadedGateway) -> httpx.Response:
    return httpx.post(
        gateway.url + "/v1/files",
        content=chunked_upload(),
        headers={
            "Authorization": f"Bearer {MASTER_KEY}",
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        },
        timeout=15,
    )


# -- a request whose body left is never sent again ---------------------------------------------------------


@pytest.mark.parametrize("call", CALLS)
def test_a_stalled_upstream_receives_one_copy(
    call: str, start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI
) -> None:
    # pyreqwest reports an upstream that took the request and sends no status line as a "connect"
    # timeout; the request went out whole all the same.
    gateway = start_gateway(request_timeout_s=0.5, stream_read_timeout_s=0.5)
    fake.stall(times=3)
    path, body = CALLS[call]
    response = post(gateway, path, body)
    assert response.status == 504
    assert response.error_code() == "upstream_timeout"
    assert response.headers["x-gateway-attempts"] == "1"
    assert len(fake.requests) == 1
    # And the gateway hung up rather than leave the upstream working on an answer nobody reads.
    fake.wait_for(lambda r: r.disconnected)


def test_a_stalled_upstream_receives_one_copy_of_a_streamed_upload(
    start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI
) -> None:
    gateway = start_gateway(stream_read_timeout_s=0.5)
    fake.stall(times=3)
    response = upload(gateway)
    assert response.status_code == 504
    assert response.headers["x-gateway-attempts"] == "1"
    assert [r.path for r in fake.requests] == ["/v1/files"]


def test_a_streamed_upload_the_upstream_hangs_up_on_is_not_sent_again(
    start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI
) -> None:
    # A JSON call in hand is sent again after such a drop (tests/gateway/test_retries.py), as the OpenAI
    # SDKs do; a stream already (partly) read from the client cannot be, whole.
    gateway = start_gateway()
    fake.drop_connection(times=3)
    response = upload(gateway)
    assert response.status_code == 502
    assert response.headers["x-gateway-attempts"] == "1"
    assert [r.path for r in fake.requests] == ["/v1/files"]


# -- redirects ---------------------------------------------------------------------------------------------


@pytest.fixture
def elsewhere() -> Iterator[FakeOpenAI]:
    """Another host: a followed redirect would hand it the prompt."""
    with FakeOpenAI() as other:
        yield other


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v1/chat/completions", CHAT, 307),
        ("POST", "/v1/chat/completions", STREAM, 308),
        ("POST", "/v1/moderations", CALLS["passthrough"][1], 303),
        ("GET", "/v1/files", None, 302),
    ],
)
def test_an_upstream_redirect_is_refused_not_followed(
    method: str,
    path: str,
    body: dict[str, Any] | None,
    status: int,
    gateway: ThreadedGateway,
    fake: FakeOpenAI,
    elsewhere: FakeOpenAI,
) -> None:
    location = elsewhere.base_url + path.removeprefix("/v1")
    fake.fail(status, body=b"", headers={"Location": location}, method=method)
    response = raw_request(
        gateway.port,
        method,
        path,
        headers={"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"},
        body=orjson.dumps(body) if body is not None else b"",
    )
    assert response.status == 502
    assert response.error_code() == "upstream_redirect"
    # The SDKs follow a Location: the client would carry its gateway key there.
    assert "location" not in response.headers
    assert elsewhere.requests == []
    assert len(fake.requests) == 1


# -- the deadline bounds the whole call --------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("retried", [False, True], ids=["first-attempt", "after-a-retry"])
def test_the_deadline_bounds_every_attempt(
    stream: bool, retried: bool, start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI
) -> None:
    # Attempts that the request and stream timeouts alone would let run for 30 s.
    gateway = start_gateway(retry_deadline_s=1.0, request_timeout_s=30, stream_read_timeout_s=30)
    if retried:
        fake.fail(500, headers={"retry-after-ms": "100"})
    fake.stall()
    started = time.monotonic()
    with sdk_client(gateway.base_url, timeout=15) as sdk, pytest.raises(openai.APIStatusError) as caught:
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=stream)
    elapsed = time.monotonic() - started
    assert caught.value.status_code == 504
    assert elapsed < 10  # the deadline is 1 s
    # This call's attempts, told by the SDK's user agent the gateway forwards: the session's fake can still
    # receive bodiless POSTs from earlier tests' upstream requests, which pyreqwest detaches, not aborts,
    # when the gateway gives up on them (SECURITY.md, "Known limits").
    attempts = [r for r in fake.requests if r.headers.get("user-agent", "").startswith("OpenAI/")]
    assert len(attempts) == (2 if retried else 1)


def test_no_wait_crosses_the_deadline(
    start_gateway: Callable[..., ThreadedGateway], elsewhere: FakeOpenAI
) -> None:
    # The first attempt counts: 1.6 s of it and a 0.6 s wait would end past the 2 s deadline, so the
    # gateway answers with what it has rather than sleep into the deadline or past it. (The 0.4 s left of
    # the deadline is room for a loaded machine to deliver the first attempt before its answer comes.) An
    # upstream of its own, so that nothing another test left running can reach it.
    gateway = start_gateway(
        retry_deadline_s=2.0,
        max_attempts=5,
        openai_base_url=elsewhere.base_url,
        openai_api_key=elsewhere.api_key,
    )
    elsewhere.fail(500, times=5, headers={"retry-after-ms": "600"}, delay_s=1.6)
    with sdk_client(gateway.base_url) as sdk, pytest.raises(openai.InternalServerError) as caught:
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.status_code == 500
    assert caught.value.response.headers["x-gateway-attempts"] == "1"
    # Only the chat calls: a new gateway's batch poller may ask this upstream about batches that other
    # tests' gateways created in the shared database.
    calls = [r for r in elsewhere.requests if r.path == "/v1/chat/completions"]
    assert len(calls) == 1, [(r.method, r.path, r.status) for r in elsewhere.requests]


# -- an answer read whole is bounded ----------------------------------------------------------------------

CAP = 64 * 1024


@pytest.mark.parametrize(
    ("framing", "stream"),
    [("length", False), ("chunked", False), ("gzip", False), ("chunked", True)],
    ids=["content-length", "chunked", "gzip", "json-answer-to-a-stream"],
)
def test_an_answer_read_whole_is_capped(
    framing: str, stream: bool, start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI
) -> None:
    gateway = start_gateway(max_answer_bytes=CAP)
    body = STREAM if stream else CHAT
    fake.flood(CAP // 2, framing)
    allowed = post(gateway, "/v1/chat/completions", body)
    assert allowed.status == 200
    assert len(allowed.body) > CAP // 2
    # gzip: a few KB on the wire, four times the cap once decoded.
    fake.flood(4 * CAP, framing)
    refused = post(gateway, "/v1/chat/completions", body)
    assert refused.status == 502
    assert refused.error_code() == "upstream_answer_too_large"
    assert refused.headers["x-gateway-attempts"] == "1"
