"""SSE keep-alives: while a stream waits on a silent upstream (before its first byte, or between events)
the gateway sends `: keep-alive` comments every GATEWAY_SSE_KEEPALIVE_S, which both official SDKs skip.
Once one went, the 200 is committed: a later failure is an OpenAI error event the SDKs raise."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import orjson
import pytest

from tests.conftest import sdk_client
from tests.db import wait_for_rows
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, ThreadedGateway
from tests.security import RawResponse, raw_request

NODE_TESTS = Path(__file__).resolve().parents[1] / "node"
INTERVAL = 0.1
# The upstream's silence: several intervals, far below any read timeout.
SILENCE = 0.6
MESSAGES: list[dict[str, str]] = [{"role": "user", "content": "hi"}]
COMMENT = b": keep-alive\n\n"


def raw_stream(gateway: ThreadedGateway) -> RawResponse:
    body = orjson.dumps({"model": "gpt-4o", "messages": MESSAGES, "stream": True})
    return raw_request(
        gateway.port,
        "POST",
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"},
        body=body,
    )


def sdk_text(gateway: ThreadedGateway) -> str:
    with sdk_client(gateway.base_url) as sdk:
        stream = sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


@pytest.fixture(autouse=True)
def _prompt_fake_afterwards(fake: FakeOpenAI) -> Iterator[None]:
    # The fake is shared by the session and its reset() keeps the delays: later tests need none.
    yield
    fake.first_token_delay_s = fake.inter_token_delay_s = 0.0


@pytest.fixture
def kept_alive(start_gateway: Callable[..., ThreadedGateway]) -> ThreadedGateway:
    return start_gateway(sse_keepalive_s=INTERVAL, max_attempts=1)


def test_comments_while_the_upstream_thinks_before_its_first_token(
    kept_alive: ThreadedGateway, fake: FakeOpenAI
) -> None:
    fake.first_token_delay_s = SILENCE
    answer = raw_stream(kept_alive)
    assert answer.status == 200
    assert answer.headers["cache-control"] == "no-cache"
    assert answer.headers["x-accel-buffering"] == "no"
    assert answer.body.startswith(COMMENT)
    # One every interval (to a quarter more): more than one, whatever the load on the machine.
    assert answer.body.count(COMMENT) >= 2
    assert answer.body.endswith(b"data: [DONE]\n\n")
    # The Python SDK skips them.
    assert sdk_text(kept_alive)


def test_comments_before_the_upstream_answers_at_all(kept_alive: ThreadedGateway, fake: FakeOpenAI) -> None:
    fake.slow_first_byte(SILENCE)
    answer = raw_stream(kept_alive)
    assert answer.status == 200 and answer.body.startswith(COMMENT)
    # The upstream's own headers came too late to be sent: the gateway's stream headers are all there is.
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert "x-gateway-attempts" not in answer.headers
    events = [e for e in answer.body.split(b"\n\n") if e and not e.startswith(b":")]
    assert events[-1] == b"data: [DONE]"


def test_comments_between_events(kept_alive: ThreadedGateway, fake: FakeOpenAI) -> None:
    fake.reply(chunks=["Hello", " there"])
    fake.inter_token_delay_s = SILENCE
    answer = raw_stream(kept_alive)
    first_event = answer.body.index(b"data: ")
    # The first event came at once; comments went between the later ones, never inside one.
    assert COMMENT in answer.body[first_event:]
    for event in answer.body.split(b"\n\n"):
        assert not event or event.startswith((b"data: ", b": keep-alive")), event


def test_a_failure_after_a_comment_is_an_error_event_the_sdk_raises(
    kept_alive: ThreadedGateway, fake: FakeOpenAI, database_url: str
) -> None:
    fake.fail(503, delay_s=SILENCE)
    answer = raw_stream(kept_alive)
    assert answer.status == 200 and answer.body.startswith(COMMENT)
    error = orjson.loads(answer.body.rsplit(b"data: ", 1)[1])["error"]
    assert error["type"] and error["message"]
    fake.fail(503, delay_s=SILENCE)
    request_id = f"ka-{uuid.uuid4().hex}"
    with sdk_client(kept_alive.base_url) as sdk:
        stream = sdk.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            stream=True,
            extra_headers={"X-Request-Id": request_id},  # type: ignore[arg-type]
        )
        with pytest.raises(openai.APIError):
            list(stream)
    # The row keeps what really happened, though the client saw a 200.
    (row,) = wait_for_rows(kept_alive.settings.database_url or "", request_id)
    assert row["status_code"] == 503


def test_a_failure_before_any_comment_keeps_its_status(kept_alive: ThreadedGateway, fake: FakeOpenAI) -> None:
    fake.fail(429, headers={"retry-after": "1"})
    with sdk_client(kept_alive.base_url) as sdk, pytest.raises(openai.RateLimitError):
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)  # type: ignore[arg-type]


def test_off(start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI) -> None:
    gateway = start_gateway(sse_keepalive_s=0)
    fake.first_token_delay_s = 0.3
    answer = raw_stream(gateway)
    assert answer.status == 200 and COMMENT not in answer.body
    assert answer.headers["cache-control"] == "no-cache"


@pytest.mark.parametrize("fails", [False, True])
def test_node_sdk_reads_a_kept_alive_stream(
    kept_alive: ThreadedGateway, fake: FakeOpenAI, fails: bool
) -> None:
    node = shutil.which("node")
    if node is None or not (NODE_TESTS / "node_modules" / "openai").is_dir():
        pytest.fail("Node.js and tests/node/node_modules are needed: `make test` installs them (npm ci)")
    env = {**os.environ, "GATEWAY_BASE_URL": kept_alive.base_url, "GATEWAY_API_KEY": MASTER_KEY}
    if fails:
        fake.fail(503, delay_s=SILENCE)
        env["EXPECT_ERROR"] = "1"
    else:
        fake.first_token_delay_s = SILENCE
    result = subprocess.run(
        [node, "--test", "--test-reporter=spec", "keepalive.test.mjs"],
        cwd=NODE_TESTS,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\bpass 1\b", result.stdout), result.stdout
    assert re.search(r"\bfail 0\b", result.stdout), result.stdout
