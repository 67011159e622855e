"""A large event goes out as it arrives instead of after its end (store-and-forward made a 20 MB event take
2.5-3x as long as direct), its end still inspected whole; and its text is parsed only if the stream ends
without usage, still counted then, in its place among the other deltas."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import openai
import orjson
import pytest

from app.metering import tokens
from app.proxy.event_framing import EventFramer
from tests.db import wait_for_rows
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, ThreadedGateway
from tests.security.test_sse_relay import relay_until

MESSAGES = [{"role": "user", "content": "Say a lot."}]
CAP = 1024 * 1024
# A long event among short ones, with every line end SSE allows.
STREAM = b"data: a\n\ndata: " + b"b" * 300 + b"\r\n\r\n: note\r\rdata: c\ndata: " + b"d" * 50 + b"\r\n\n"
NORMALISED = STREAM.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_what_goes_early_and_the_rest_of_each_event_make_the_stream(size: int) -> None:
    framer = EventFramer(1024)
    events, relayed, given = [], [], b""
    for start in range(0, len(STREAM), size):
        read = STREAM[start : start + size]
        if out := framer.feed(read):
            events.append(out)
            # Whole events, the first of which went in part already.
            assert out.startswith(given)
            relayed.append(out[len(given) :])
            given = b""
        else:
            early = framer.take_early()
            given += early
            relayed.append(early)
    assert b"".join(events) == NORMALISED
    assert b"".join(relayed) == NORMALISED


def _stream_bytes(url: str, request_id: str, **request: object) -> bytes:
    with httpx.stream(
        "POST",
        url + "/chat/completions",
        json={"model": "gpt-4o", "messages": MESSAGES, "stream": True, **request},
        headers={"authorization": f"Bearer {MASTER_KEY}", "x-request-id": request_id},
        timeout=30,
    ) as response:
        assert response.status_code == 200
        return response.read()


_FIRST = {
    "id": "chatcmpl-endless",
    "object": "chat.completion.chunk",
    "created": 1,
    "model": "gpt-4o",
    "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}, "finish_reason": None}],
}
_OPEN = b'data: {"choices":[{"index":0,"delta":{"content":"'


def test_an_event_that_never_ends_goes_out_as_it_arrives_and_is_ended_where_the_cap_cuts_it(
    start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI, database_url: str
) -> None:
    """Before, nothing of it went out: the event was held until its end, or here until the cap."""
    gateway = start_gateway(max_event_bytes=CAP)
    fake.stream_raw(b"data: " + orjson.dumps(_FIRST) + b"\n\n", _OPEN, endless=b"y" * 16384)
    body = _stream_bytes(gateway.base_url, "big-event-endless")
    first, partial, error, end = body.split(b"\n\n")
    assert first == b"data: " + orjson.dumps(_FIRST)
    assert partial.startswith(_OPEN)
    assert partial[len(_OPEN) :].strip(b"y") == b""
    assert CAP // 2 < len(partial) <= CAP
    # Ended by a blank line, so that the error event after it is an event of its own.
    assert json.loads(error.removeprefix(b"data: "))["error"]["code"] == "upstream_event_too_large"
    assert end == b""
    (row,) = wait_for_rows(database_url, "big-event-endless")
    assert row["error_type"] == "upstream_event_too_large"
    assert row["completion_tokens"] == tokens.count_text("gpt-4o", "Hi")


def test_an_event_broken_off_after_its_start_went_out_is_ended_before_the_error_event(
    gateway: ThreadedGateway, fake: FakeOpenAI
) -> None:
    fake.stream_raw(b"data: " + orjson.dumps(_FIRST) + b"\n\n", _OPEN, *[b"y" * 16384] * 20)
    body = _stream_bytes(gateway.base_url, "big-event-broken")
    _, partial, error, end = body.split(b"\n\n")
    assert partial.startswith(_OPEN + b"y" * 65536)
    assert json.loads(error.removeprefix(b"data: "))["error"]["code"] == "upstream_stream_incomplete"
    assert end == b""


def test_the_sdk_raises_on_an_event_ended_where_the_cap_cut_it(
    start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI
) -> None:
    """A stream that just stopped there would end without an error: the event, never ended, is dropped."""
    gateway = start_gateway(max_event_bytes=CAP)
    fake.stream_raw(b"data: " + orjson.dumps(_FIRST) + b"\n\n", _OPEN, endless=b"y" * 16384)
    _, relayed = relay_until(json.JSONDecodeError, gateway.base_url)
    assert relayed == ["Hi"]


def test_the_end_of_a_large_event_is_still_inspected_whole(
    gateway: ThreadedGateway, fake: FakeOpenAI
) -> None:
    """The `"usage":null` the gateway asked for, though the client did not, is taken out of its end."""
    text = "many words " * 200_000
    fake.reply(chunks=["Start:", text], usage={"prompt_tokens": 9, "completion_tokens": 400_000})
    body = _stream_bytes(gateway.base_url, "big-event-usage")
    assert b'"usage"' not in body
    chunks = [orjson.loads(event[6:]) for event in body.split(b"\n\n") if event.startswith(b"data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "Start:" + text
    assert body.endswith(b"data: [DONE]\n\n")


def test_huge_events_of_a_stream_broken_off_before_its_usage_count_in_their_place(
    gateway: ThreadedGateway, fake: FakeOpenAI, database_url: str
) -> None:
    """Two events past the relay's 64 KiB of unparsed chunks, each followed by more than 64 KiB of small
    ones, then the upstream breaks off: every delta counts, in order."""
    small = [f"s{i} " for i in range(400)]
    # Each big one ends with a quote that makes "'s" one token with the small one after it: the count
    # changes when the pieces move.
    chunks = ["Start:", "big one " * 20_000 + "'", *small, "second big " * 20_000 + "'", *small[:5]]
    fake.reply(chunks=chunks)
    fake.drop_mid_stream(after_chunks=len(chunks) + 1)  # the role chunk, then all of these
    _, relayed = relay_until(
        openai.APIError, gateway.base_url, "big-event-estimate", stream_options={"include_usage": True}
    )
    assert relayed[1:] == chunks
    (row,) = wait_for_rows(database_url, "big-event-estimate")
    assert row["usage_source"] == "estimated"
    assert row["completion_tokens"] == tokens.count_text("gpt-4o", "".join(relayed))
