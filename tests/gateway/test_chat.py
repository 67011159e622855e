"""POST /v1/chat/completions as the official SDK uses it: JSON, streams, tools, structured outputs."""

from __future__ import annotations

import json

import httpx
import openai
import orjson
import pydantic

from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, ThreadedGateway

MESSAGES = [{"role": "user", "content": "Say hello"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}


def test_json_reply_is_relayed_unchanged(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    usage = {"prompt_tokens": 31, "completion_tokens": 9, "total_tokens": 40}
    fake.reply("Hi there!", usage={**usage, "prompt_tokens_details": {"cached_tokens": 12}})
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    reply = raw.parse()
    assert reply.choices[0].message.content == "Hi there!"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.model == "gpt-4o-mini-2024-07-18"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (31, 9, 40)
    assert reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens == 12
    # Fields the gateway knows nothing about reach the client as the upstream sent them.
    body = json.loads(raw.http_response.content)
    assert body["system_fingerprint"] == reply.system_fingerprint
    assert body["service_tier"] == "default"
    assert raw.headers["x-gateway-attempts"] == "1"
    assert raw.headers["x-upstream-request-id"] == fake.requests[0].request_id
    assert raw.headers["x-ratelimit-remaining-requests"]


def test_every_request_field_passes_through_untouched(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    schema = {
        "name": "answer",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"answer": {"type": "string"}},
            "required": ["answer"],
            "additionalProperties": False,
        },
    }
    sent = {
        "model": "gpt-4o",
        "messages": MESSAGES,
        "tools": [WEATHER_TOOL],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "response_format": {"type": "json_schema", "json_schema": schema},
        "n": 2,
        "seed": 7,
        "logprobs": True,
        "top_logprobs": 2,
        "temperature": 0.2,
        "metadata": {"team": "search"},
        "store": False,
        "user": "user-7",
    }
    client.chat.completions.create(
        **sent,  # type: ignore[arg-type]
        extra_body={"a_future_field": {"nested": [1, 2.5, None, "x"]}},
    )
    received = fake.requests[0].json
    assert received == {**sent, "a_future_field": {"nested": [1, 2.5, None, "x"]}}


def test_tool_call_reply_with_null_content(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    reply = client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, tools=[WEATHER_TOOL], tool_choice="required"
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city", "unit"}


class Answer(pydantic.BaseModel):
    city: str
    population: int
    capital: bool


def test_structured_output_parse(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    completion = client.chat.completions.parse(model="gpt-4o", messages=MESSAGES, response_format=Answer)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Answer)
    sent_format = fake.requests[0].json["response_format"]
    assert sent_format["type"] == "json_schema"
    assert sent_format["json_schema"]["strict"] is True


def test_stream_without_include_usage_never_shows_the_usage_chunk(
    client: openai.OpenAI, fake: FakeOpenAI
) -> None:
    fake.reply("one two three four")
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    # The way client code commonly reads a stream: it must not raise on any chunk.
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text == "one two three four"
    assert len(chunks) >= 4
    assert all(chunk.usage is None for chunk in chunks)
    # ...while the upstream was asked for usage all the same.
    assert fake.requests[0].json["stream_options"] == {"include_usage": True}
    assert fake.requests[0].usage is not None


def test_a_streamed_request_reaches_the_upstream_as_sent_plus_the_usage_option(
    gateway: ThreadedGateway, fake: FakeOpenAI
) -> None:
    """Unknown fields, key order, spacing and number spelling survive: the option is appended to the
    client's bytes; a client that set stream_options of its own gets them merged."""
    fake.reply("ok")
    fake.reply("ok")
    sent = (
        b'{"model": "gpt-4o",  "messages": [{"role": "user", "content": "Hi \\u00e9"}],'
        b' "stream": true, "x_vendor": {"weights": [1.50, 2e3]}}\n'
    )
    merged = {"model": "gpt-4o", "messages": MESSAGES, "stream": True, "stream_options": {"extra": 1}}
    with httpx.Client() as http:
        for body in (sent, orjson.dumps(merged)):
            response = http.post(
                gateway.base_url + "/chat/completions",
                content=body,
                headers={"authorization": f"Bearer {MASTER_KEY}", "content-type": "application/json"},
            )
            assert response.status_code == 200
            assert b"data: [DONE]" in response.content
            assert b'"usage":{' not in response.content
    assert fake.requests[0].body == sent.rstrip()[:-1] + b',"stream_options":{"include_usage":true}}'
    assert fake.requests[1].json["stream_options"] == {"extra": 1, "include_usage": True}


def test_stream_with_include_usage_relays_the_usage_chunk(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    usage = {"prompt_tokens": 17, "completion_tokens": 4, "total_tokens": 21}
    fake.reply("a b c d", usage={**usage, "completion_tokens_details": {"reasoning_tokens": 2}})
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (17, 4, 21)
    assert last.usage.completion_tokens_details is not None
    assert last.usage.completion_tokens_details.reasoning_tokens == 2
    assert all(chunk.choices for chunk in chunks[:-1])


def test_stream_is_byte_for_byte_openai_framing(gateway: ThreadedGateway, fake: FakeOpenAI) -> None:
    body = {
        "model": "gpt-4o",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.Client() as http:
        through_gateway = http.post(
            gateway.base_url + "/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {MASTER_KEY}"},
        )
        direct = http.post(
            fake.base_url + "/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {fake.api_key}"},
        )
    assert through_gateway.headers["content-type"] == direct.headers["content-type"]
    ours = through_gateway.content.split(b"\n\n")
    theirs = direct.content.split(b"\n\n")
    assert len(ours) == len(theirs)
    assert ours[-2:] == [b"data: [DONE]", b""]
    for mine, upstream in zip(ours[:-2], theirs[:-2], strict=True):
        assert mine.startswith(b"data: {")
        # Same keys and order; only ids and timings differ between the two calls.
        assert list(json.loads(mine[6:])) == list(json.loads(upstream[6:]))


def test_tool_call_arguments_stream_as_deltas(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    arguments = '{"city": "Paris", "unit": "c"}'
    fake.reply(tool_calls=[{"name": "get_weather", "arguments": arguments}])
    stream = client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, tools=[WEATHER_TOOL], tool_choice="required", stream=True
    )
    fragments = []
    finish = None
    for chunk in stream:
        delta = chunk.choices[0].delta
        for tool_call in delta.tool_calls or []:
            if tool_call.function and tool_call.function.arguments:
                fragments.append(tool_call.function.arguments)
        finish = chunk.choices[0].finish_reason or finish
    assert len(fragments) > 1
    assert "".join(fragments) == arguments
    assert finish == "tool_calls"


def test_sdk_stream_helper(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.reply("streamed with the helper")
    deltas = []
    with client.chat.completions.stream(model="gpt-4o", messages=MESSAGES) as stream:
        for event in stream:
            if event.type == "content.delta":
                deltas.append(event.delta)
        final = stream.get_final_completion()
    assert "".join(deltas) == "streamed with the helper"
    assert final.choices[0].message.content == "streamed with the helper"


def test_stream_events_reach_the_client_before_the_upstream_finishes(
    client: openai.OpenAI, fake: FakeOpenAI
) -> None:
    # The upstream sends three events and then goes silent: a buffering relay would hold them back.
    fake.hang_stream(chunks_before_hang=3)
    stream = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    first = next(iter(stream))
    second = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    assert second.choices[0].delta.content
    stream.close()


def test_client_disconnect_closes_the_upstream_request(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.hang_stream(chunks_before_hang=2)
    stream = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    next(iter(stream))
    stream.close()
    record = fake.wait_for(lambda request: request.disconnected, timeout=5)
    assert record.path == "/v1/chat/completions"


def test_upstream_breaking_a_stream_off_raises_in_the_sdk(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.drop_mid_stream(after_chunks=2)
    stream = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    received = []
    try:
        for chunk in stream:
            received.append(chunk)
        raise AssertionError("the stream ended without an error")
    except openai.APIError as exc:
        assert "upstream" in exc.message.lower()
    assert len(received) == 2
    # Not retried: bytes had already gone to the client.
    assert len(fake.requests) == 1


def test_a_model_name_outside_latin_1_is_answered_with_its_name_percent_encoded(
    client: openai.OpenAI, fake: FakeOpenAI
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="模型-1", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.status_code == 200
    assert raw.headers["x-gateway-model"] == "%E6%A8%A1%E5%9E%8B-1"
    assert raw.parse().choices[0].message.content
