"""Usage rows tell the truth: a call the client abandoned says so (499, client_disconnected) with the tokens
the upstream billed for it, input the gateway refuses itself leaves no row, and a budget message shows the
digits of the cap."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable
from pathlib import Path

import openai
import orjson
import pytest

from tests.conftest import sdk_client
from tests.db import usage_rows, wait_for_rows
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, ThreadedGateway

MESSAGES = [{"role": "user", "content": "hi"}]
# Long enough for the client to leave (and the gateway to notice) before the upstream answers.
UPSTREAM_THINKS_S = 1.5


def rid() -> str:
    return f"truth-{uuid.uuid4().hex}"


def _open_then_abandon(
    port: int, path: str, body: dict[str, object], request_id: str, fake: FakeOpenAI
) -> None:
    """Send a call over a raw socket and close the socket once the upstream has it, as a client that gives
    up waiting does."""
    payload = orjson.dumps(body)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {MASTER_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        f"X-Request-Id: {request_id}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode() + payload)
        fake.wait_for(lambda r: r.path == path)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": MESSAGES}),
        ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"}),
        ("/v1/responses", {"model": "gpt-4o-mini", "input": "hi"}),
    ],
    ids=["chat", "embeddings", "responses"],
)
def test_an_abandoned_call_says_so_with_the_tokens_the_upstream_billed(
    path: str, body: dict[str, object], gateway: ThreadedGateway, fake: FakeOpenAI, database_url: str
) -> None:
    """The upstream cannot be stopped once it has the request (the HTTP client cannot abort a request
    waiting for its answer), so it answers and bills: the row keeps that answer's usage, and says the
    client never got it."""
    fake.slow_first_byte(UPSTREAM_THINKS_S)
    request_id = rid()
    _open_then_abandon(gateway.port, path, body, request_id, fake)
    (row,) = wait_for_rows(database_url, request_id, timeout=UPSTREAM_THINKS_S + 10)
    assert (row["status_code"], row["error_type"]) == (499, "client_disconnected")
    assert row["endpoint"] == path
    assert row["attempts"] == 1
    assert row["usage_source"] == "upstream" and row["prompt_tokens"] > 0
    assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]
    if path != "/v1/embeddings":
        assert row["completion_tokens"] > 0


def test_a_stream_abandoned_before_its_first_byte_is_closed_upstream(
    gateway: ThreadedGateway, fake: FakeOpenAI, database_url: str
) -> None:
    fake.slow_first_byte(UPSTREAM_THINKS_S)
    # A model writing slowly: closed after its first bytes, the stream is still being written.
    fake.inter_token_delay_s = 1.0
    request_id = rid()
    path = "/v1/chat/completions"
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    try:
        _open_then_abandon(gateway.port, path, body, request_id, fake)
        (row,) = wait_for_rows(database_url, request_id, timeout=UPSTREAM_THINKS_S + 10)
    finally:
        fake.inter_token_delay_s = 0.0
    assert (row["status_code"], row["error_type"]) == (499, "client_disconnected")
    # Closed as soon as it answered, so the upstream stops generating: the prompt is counted, no answer.
    fake.wait_for(lambda r: r.path == path and r.disconnected)
    assert row["usage_source"] == "estimated" and row["prompt_tokens"] > 0 and row["completion_tokens"] == 0


@pytest.mark.parametrize("stream_options", ["x", 1, ["include_usage"], True])
def test_input_the_gateway_refuses_itself_leaves_no_row(
    stream_options: object, client: openai.OpenAI, fake: FakeOpenAI, database_url: str
) -> None:
    refused = rid()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            extra_body={"stream_options": stream_options},
            extra_headers={"X-Request-Id": refused},
        )
    assert caught.value.param == "stream_options"
    # A call after it is written after it: once its row is there, the refused call's would be too.
    served = rid()
    client.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,  # type: ignore[arg-type]
        extra_headers={"X-Request-Id": served},
    )
    wait_for_rows(database_url, served)
    assert usage_rows(database_url, refused) == []
    assert len(fake.requests) == 1


# Cap per feature, and how the budget message shows it.
CAPS = {
    "tiny": ("0.0001", "$0.0001"),
    "small": ("0.00025", "$0.00025"),
    "half": ("0.5", "$0.50"),
    "three": ("3", "$3.00"),
}


def test_a_budget_message_keeps_the_digits_of_the_cap(
    start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI, tmp_path: Path
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "features:\n" + "".join(f"  {name}: {{budget_daily_usd: {cap}}}\n" for name, (cap, _) in CAPS.items())
    )
    gateway = start_gateway(config_file=config)
    with sdk_client(gateway.base_url) as sdk:
        for feature, (_, shown) in CAPS.items():
            with pytest.raises(openai.RateLimitError) as caught:
                # Estimated at its max_tokens (1M output tokens of gpt-4o: $10), each call is over its cap.
                sdk.chat.completions.create(
                    model="gpt-4o",
                    messages=MESSAGES,  # type: ignore[arg-type]
                    max_tokens=1_000_000,
                    extra_headers={"X-Feature": feature},
                )
            assert caught.value.code == "budget_exceeded"
            expected = f"The daily budget of {shown} for feature '{feature}' is spent ($0.00 so far)"
            assert expected in caught.value.message
    assert fake.requests == []
