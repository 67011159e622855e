"""OpenAI's dialect on its own: usage in its spellings, JSON answers, errors, the include_usage splice,
chat chunks and the Responses API's events, read into a call's record."""

from __future__ import annotations

import orjson
import pytest

from app.call.record import CallRecord, Usage
from app.wire import openai
from app.wire.dialect import Payload, Prompt


def _call() -> CallRecord:
    return CallRecord(request_id="r", method="POST", path="/v1/chat/completions")


def test_usage_in_chat_and_responses_spellings() -> None:
    chat = {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 4, "audio_tokens": 1, "image_tokens": 2},
        "completion_tokens_details": {"reasoning_tokens": 3, "audio_tokens": 1},
    }
    assert openai.usage_of(chat) == Usage(10, 5, 15, 4, 3, 1, 1, 2, 0)
    responses = {
        "input_tokens": 8,
        "output_tokens": 2,
        "input_tokens_details": {"cached_tokens": 8},
        "output_tokens_details": {"reasoning_tokens": 1},
    }
    # No total: the sum.
    assert openai.usage_of(responses) == Usage(8, 2, 10, cached_tokens=8, reasoning_tokens=1)
    assert (
        openai.usage_of({"input_token_details": {"audio_tokens": 6}, "input_tokens": 6}).audio_prompt_tokens
        == 6
    )


def test_usage_ignores_what_is_not_a_count() -> None:
    odd = {"prompt_tokens": True, "completion_tokens": -1, "total_tokens": "9", "prompt_tokens_details": []}
    assert openai.usage_of(odd) == Usage()


def test_a_json_answer_gives_model_usage_and_tier() -> None:
    call = _call()
    answer = {
        "model": "gpt-4o-2024-08-06",
        "service_tier": "flex",
        "choices": [{"message": {"content": "hi"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
    assert openai.CHAT.read_answer(call.outcome, orjson.dumps(answer)) == answer
    assert call.outcome.upstream_model == "gpt-4o-2024-08-06"
    assert call.outcome.usage == Usage(3, 1, 4)
    assert call.outcome.service_tier == "flex"
    # The usage counts the completion: no text kept for counting it.
    assert call.outcome.completion_parts == []


def test_a_json_answer_without_usage_keeps_its_text() -> None:
    call = _call()
    message = {
        "content": "Hello",
        "tool_calls": [{"function": {"name": "lookup", "arguments": '{"q":1}'}}],
    }
    answer = {"model": "m", "service_tier": "x" * 33, "choices": [{"message": message}, "junk"]}
    openai.JSON.read_answer(call.outcome, orjson.dumps(answer))
    assert call.outcome.usage is None
    assert call.outcome.completion_parts == ["Hello", "lookup", '{"q":1}']
    # Not read without usage, and bounded anyway: it is stored.
    assert call.outcome.service_tier is None


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'"text"'])
def test_an_answer_that_is_no_object_teaches_nothing(body: bytes) -> None:
    call = _call()
    assert openai.JSON.read_answer(call.outcome, body) is None
    assert call.outcome.usage is None and call.outcome.upstream_model is None


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"error": {"code": "rate_limit_exceeded", "type": "requests"}}', "rate_limit_exceeded"),
        (b'{"error": {"code": null, "type": "invalid_request_error"}}', "invalid_request_error"),
        (b'{"error": {"code": 42}}', "upstream_400"),
        (b'{"error": "flat"}', "upstream_400"),
        (b"[]", "upstream_400"),
        (b"<html>bad gateway</html>", "upstream_400"),
    ],
)
def test_errors_are_classified_by_code_then_type_then_status(body: bytes, expected: str) -> None:
    assert openai.JSON.error_type(400, body) == expected


def test_a_stream_asks_for_usage_by_appending_to_the_clients_bytes() -> None:
    raw = b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}\n'
    body = orjson.loads(raw)
    payload = openai.CHAT.payload(raw, body, modified=False, stream=True)
    assert not payload.client_wants_usage and not payload.modified
    sent = orjson.loads(payload.for_model("m"))
    assert sent == {**orjson.loads(raw), "stream_options": {"include_usage": True}}
    assert payload.raw.startswith(raw.rstrip()[:-1])


def test_a_client_that_asked_for_usage_is_sent_its_own_bytes() -> None:
    raw = b'{"model": "m", "stream": true, "stream_options": {"include_usage": true}, "messages": []}'
    payload = openai.CHAT.payload(raw, orjson.loads(raw), modified=False, stream=True)
    assert payload.client_wants_usage
    assert payload.for_model("m") is raw


def test_other_stream_options_are_kept_and_the_body_reserialised() -> None:
    raw = b'{"model": "m", "stream": true, "stream_options": {"include_obfuscation": false}, "messages": []}'
    payload = openai.CHAT.payload(raw, orjson.loads(raw), modified=False, stream=True)
    assert not payload.client_wants_usage and payload.modified
    assert orjson.loads(payload.for_model("m"))["stream_options"] == {
        "include_obfuscation": False,
        "include_usage": True,
    }


def test_a_call_that_does_not_stream_goes_as_sent() -> None:
    raw = b'{"model": "m", "messages": []}'
    payload = openai.CHAT.payload(raw, orjson.loads(raw), modified=False, stream=False)
    assert payload.for_model("m") is raw
    assert orjson.loads(payload.for_model("other"))["model"] == "other"


def _chunk(body: dict[str, object]) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


def test_the_include_usage_chunk_is_read_and_kept_from_a_client_that_did_not_ask() -> None:
    first = _chunk(
        {"model": "gpt-4o-mini-2024-07-18", "choices": [{"delta": {"role": "assistant"}}], "usage": None}
    )
    text = _chunk(
        {"model": "gpt-4o-mini-2024-07-18", "choices": [{"delta": {"content": "Hi"}}], "usage": None}
    )
    usage = _chunk(
        {
            "model": "gpt-4o-mini-2024-07-18",
            "service_tier": "default",
            "choices": [],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        }
    )
    call = _call()
    inspector = openai.CHAT.inspector(call.outcome, Payload(b"{}", {}, client_wants_usage=False))
    relayed = inspector.relay(first + text + usage + b"data: [DONE]\n\n")
    inspector.finish()
    assert relayed == (first + text).replace(b',"usage":null', b"") + b"data: [DONE]\n\n"
    assert inspector.done
    assert call.outcome.usage == Usage(5, 1, 6)
    assert call.outcome.service_tier == "default"
    assert call.outcome.upstream_model == "gpt-4o-mini-2024-07-18"
    # A resumed stream (nothing the gateway asked for) is relayed as it came.
    resumed = openai.CHAT.inspector(_call().outcome, None)
    assert resumed.relay(first + usage) == first + usage


def _event(kind: str, data: dict[str, object]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n"


def test_responses_events_give_usage_from_the_terminal_event() -> None:
    response = {"id": "resp_1", "model": "gpt-4.1-2025-04-14", "status": "in_progress"}
    events = [
        _event("response.created", {"response": response}),
        _event("response.output_text.delta", {"delta": "Hel"}),
        _event("response.output_text.delta", {"delta": "lo"}),
        _event(
            "response.completed",
            {
                "response": {
                    **response,
                    "status": "completed",
                    "service_tier": "priority",
                    "usage": {"input_tokens": 9, "output_tokens": 2, "total_tokens": 11},
                }
            },
        ),
    ]
    call = _call()
    inspector = openai.RESPONSES.inspector(call.outcome, None)
    stream = b"".join(events)
    # Anything after the terminal event is not part of the answer.
    assert inspector.relay(stream + _event("response.output_text.delta", {"delta": "late"})) == stream
    assert inspector.done
    assert call.outcome.upstream_model == "gpt-4.1-2025-04-14"
    assert call.outcome.usage == Usage(9, 2, 11)
    assert call.outcome.service_tier == "priority"
    assert call.outcome.completion_parts == ["Hel", "lo"]
    assert call.outcome.usage_key is None


def test_a_responses_error_event_ends_the_stream_without_usage() -> None:
    call = _call()
    inspector = openai.RESPONSES.inspector(call.outcome, None)
    error = _event("error", {"code": "server_error", "message": "boom"})
    assert inspector.relay(_event("response.output_text.delta", {"delta": "x"}) + error).endswith(error)
    assert inspector.done and call.outcome.usage is None and call.outcome.completion_parts == ["x"]


def test_a_background_response_is_keyed_by_its_id_and_creation_time() -> None:
    call = _call()
    openai.learn_response(
        call.outcome,
        {
            "id": "resp_bg",
            "background": True,
            "created_at": 1_700_000_000,
            "model": "o3",
            "usage": {"input_tokens": 1, "output_tokens": 1},
        },
    )
    assert call.outcome.usage_key == "resp_bg"
    assert call.outcome.usage_created_at == 1_700_000_000.0
    assert call.outcome.usage == Usage(1, 1, 2)


def test_prompts_in_the_shape_the_tokenizer_counts() -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}], "tools": []}
    assert openai.CHAT.prompt(chat) == Prompt(chat=chat)
    responses = {"instructions": "be brief", "input": "hi"}
    assert openai.RESPONSES.prompt(responses) == Prompt(
        chat={"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    )
    items = {"input": [{"role": "user", "content": "a"}, "not an item"]}
    assert openai.RESPONSES.prompt(items).chat == {"messages": [{"role": "user", "content": "a"}]}
    assert openai.JSON.prompt({"input": ["a", "b"]}) == Prompt(input=["a", "b"])
    assert openai.JSON.prompt({}) == Prompt(input="")


def test_the_requested_model_and_stream() -> None:
    assert openai.JSON.requested_model(b'{"model": "whisper-1"}') == "whisper-1"
    assert openai.JSON.requested_model(b"--boundary\r\nContent-Disposition: form-data") is None
    assert openai.JSON.requested_model(b'{"model": 3}') is None
    assert openai.CHAT.streamed({"stream": True})
    assert not openai.CHAT.streamed({"stream": "true"})
