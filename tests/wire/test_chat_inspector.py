"""The chat stream inspector on its own: whatever way a stream's events are grouped into reads, the
client gets the same bytes and metering learns the same model, usage and text."""

from __future__ import annotations

import orjson
import pytest

from app.call.record import CallRecord
from app.wire.openai import ChatChunkInspector, usage_of

MODEL = "gpt-4o-mini-2024-07-18"


def _chunk(delta: dict[str, object], usage: object = None, choices: bool = True) -> bytes:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": None}] if choices else [],
        "usage": usage,
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


WORDS = ["Hel", "lo", ", wor", "ld"]
USAGE = {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11}
FIRST = _chunk({"role": "assistant", "content": ""})
ORDINARY = [_chunk({"content": w}) for w in WORDS]
COMMENT = b": keep-alive\n\n"
USAGE_CHUNK = _chunk({}, usage=USAGE, choices=False)
DONE = b"data: [DONE]\n\n"

# A run of ordinary chunks longer than the inspector splits (it replaces in a long read instead).
LONG_RUN = [_chunk({"content": "x" * 1000 + w}) for w in WORDS * 20]

SHAPES = {
    "openai": [FIRST, *ORDINARY, USAGE_CHUNK, DONE],
    "a long run": [FIRST, *LONG_RUN, USAGE_CHUNK, DONE],
    "comment in the middle": [FIRST, *ORDINARY[:2], COMMENT, *ORDINARY[2:], USAGE_CHUNK, DONE],
    "no usage": [FIRST, *ORDINARY, DONE],
}


def _groupings(events: list[bytes]) -> list[list[bytes]]:
    """All in one read, one event a read, and every split into two reads."""
    whole = [b"".join(events)]
    single = list(events)
    halves = [[b"".join(events[:i]), b"".join(events[i:])] for i in range(1, len(events))]
    return [whole, single, *halves]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("client_wants_usage", [True, False])
def test_every_grouping_of_reads_relays_and_meters_the_same(shape: str, client_wants_usage: bool) -> None:
    events = SHAPES[shape]
    upstream_sent = b"".join(events)
    expected = upstream_sent if client_wants_usage else upstream_sent.replace(b',"usage":null', b"")
    if not client_wants_usage:
        # The usage chunk the gateway asked for is not the client's to see.
        expected = expected.replace(USAGE_CHUNK.replace(b',"usage":null', b""), b"")
    for reads in _groupings(events):
        call = CallRecord(request_id="r", method="POST", path="/v1/chat/completions")
        inspector = ChatChunkInspector(call.outcome, client_wants_usage)
        relayed = b"".join(inspector.relay(read) for read in reads)
        inspector.finish()
        assert relayed == expected, reads
        assert inspector.done
        assert call.outcome.upstream_model == MODEL
        if USAGE_CHUNK in events:
            assert call.outcome.usage == usage_of(USAGE)
            if shape != "a long run":  # its text is collected once the unparsed chunks pass their bound
                assert call.outcome.completion_parts == []
        else:
            assert call.outcome.usage is None
            assert "".join(call.outcome.completion_parts) == "".join(WORDS)


@pytest.mark.parametrize("model", ['odd "quoted" model', "back\\slash", "ünïcødé-模型"])
def test_the_model_is_learned_exactly_whatever_its_name(model: str) -> None:
    events = [
        chunk.replace(orjson.dumps(MODEL), orjson.dumps(model)) for chunk in (FIRST, *ORDINARY, USAGE_CHUNK)
    ]
    call = CallRecord(request_id="r", method="POST", path="/v1/chat/completions")
    inspector = ChatChunkInspector(call.outcome, client_wants_usage=True)
    assert inspector.relay(b"".join([*events, DONE])) == b"".join([*events, DONE])
    assert call.outcome.upstream_model == model
    assert call.outcome.usage == usage_of(USAGE)
