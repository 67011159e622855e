"""The fake upstream checked against the official openai SDK used directly, with no gateway between."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path

import openai
import pytest
from openai import Omit, omit
from openai.types.chat import (
    ChatCompletionChunk,
    ChatCompletionMessageParam,
    ChatCompletionStreamOptionsParam,
    ChatCompletionToolParam,
)
from pydantic import BaseModel

from tests.fakes.openai_payloads import DEFAULT_CONTENT
from tests.fakes.openai_upstream import FakeOpenAI

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the weather in Paris?"}]
PROMPT_TOKENS = 3 + 6  # 3 per message + 6 words
COMPLETION_TOKENS = 6  # "Hello", " from", " the", " fake", " upstream", "."
WEATHER_TOOL: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}


class Unit(StrEnum):
    celsius = "celsius"
    fahrenheit = "fahrenheit"


class Day(BaseModel):
    date: str
    high: float


class Forecast(BaseModel):
    city: str
    unit: Unit
    days: list[Day]
    windy: bool
    note: str | None


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def client(fake: FakeOpenAI) -> Iterator[openai.OpenAI]:
    fake.reset()
    with openai.OpenAI(base_url=fake.base_url, api_key=fake.api_key, max_retries=0, timeout=5) as sdk:
        yield sdk


def collect(
    client: openai.OpenAI,
    stream_options: ChatCompletionStreamOptionsParam | Omit = omit,
    tools: list[ChatCompletionToolParam] | Omit = omit,
) -> list[ChatCompletionChunk]:
    return list(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options=stream_options, tools=tools
        )
    )


def test_plain_create_echoes_snapshot_and_usage(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    completion = raw.parse()

    assert completion.model == "gpt-4o-mini-2024-07-18"
    assert completion.choices[0].message.content == DEFAULT_CONTENT
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (PROMPT_TOKENS, 6)
    assert completion.usage.total_tokens == PROMPT_TOKENS + COMPLETION_TOKENS
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 0
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.headers["openai-version"] == "2020-10-01"
    assert raw.headers["content-type"] == "application/json"
    assert "x-ratelimit-remaining-tokens" in raw.headers
    [recorded] = fake.requests
    assert recorded.headers["authorization"] == f"Bearer {fake.api_key}"
    assert recorded.json is not None and recorded.json["model"] == "gpt-4o-mini"
    assert recorded.usage == completion.usage.model_dump(exclude_unset=True)
    assert recorded.request_id == raw.headers["x-request-id"]


def test_scripted_reply_and_usage(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    usage = {"prompt_tokens": 40, "cached_tokens": 12, "reasoning_tokens": 7}
    fake.reply("Scripted answer", model="gpt-4o", usage=usage)
    completion = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)

    assert completion.choices[0].message.content == "Scripted answer"
    assert completion.model == "gpt-4o"
    answered = completion.usage
    assert answered is not None and answered.prompt_tokens_details and answered.completion_tokens_details
    assert (answered.prompt_tokens, answered.completion_tokens, answered.total_tokens) == (40, 2, 42)
    assert answered.prompt_tokens_details.cached_tokens == 12
    assert answered.completion_tokens_details.reasoning_tokens == 7
    # The queue is FIFO and empties back to the default.
    second = client.chat.completions.create(model="x", messages=MESSAGES)
    assert second.choices[0].message.content == DEFAULT_CONTENT


def test_stream_without_include_usage_never_sends_an_empty_choices_chunk(client: openai.OpenAI) -> None:
    chunks = collect(client)

    assert all(len(chunk.choices) == 1 for chunk in chunks)
    assert all("usage" not in chunk.model_fields_set for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(pieces) == COMPLETION_TOKENS
    assert "".join(pieces) == DEFAULT_CONTENT


def test_stream_with_include_usage_ends_with_a_usage_chunk(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    chunks = collect(client, stream_options={"include_usage": True})

    *body, last = chunks
    assert last.choices == []
    assert last.usage is not None and last.usage.total_tokens == PROMPT_TOKENS + COMPLETION_TOKENS
    assert all(c.usage is None and "usage" in c.model_fields_set for c in body)
    assert fake.wait_for(lambda r: r.status == 200).usage == last.usage.model_dump(exclude_unset=True)


def test_upstream_that_ignores_include_usage(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.reply(stream_usage=False)
    chunks = collect(client, stream_options={"include_usage": True})

    assert all(len(chunk.choices) == 1 for chunk in chunks)
    assert fake.wait_for(lambda r: r.status == 200).usage is None


def test_required_tool_choice_answers_with_a_tool_call(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, tools=[WEATHER_TOOL], tool_choice="required"
    )

    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "example", "days": 1}


def test_streamed_tool_call_arguments_concatenate_to_json(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.reply(
        tool_calls=[
            {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}},
            {"name": "get_time", "arguments": "{}"},
        ]
    )
    chunks = collect(client, tools=[WEATHER_TOOL])

    arguments: dict[int, str] = {}
    fragments = 0
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or []:
            assert delta.function is not None
            arguments[delta.index] = arguments.get(delta.index, "") + (delta.function.arguments or "")
            fragments += 1
    assert fragments > 4
    assert json.loads(arguments[0]) == {"city": "Paris", "days": 3}
    assert json.loads(arguments[1]) == {}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_parse_with_a_pydantic_response_format(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model="gpt-4o-mini", messages=MESSAGES, response_format=Forecast
    )

    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Forecast)
    assert parsed.unit is Unit.celsius and len(parsed.days) == 1 and parsed.windy


def test_stream_helper(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(
        model="gpt-4o-mini",
        messages=MESSAGES,
        response_format=Forecast,
        stream_options={"include_usage": True},
    ) as stream:
        # The role chunk's "" content is reported as a delta too.
        deltas = [event.delta for event in stream if event.type == "content.delta" and event.delta]
        final = stream.get_final_completion()

    assert len(deltas) > 1
    assert isinstance(final.choices[0].message.parsed, Forecast)
    assert final.usage is not None and final.usage.completion_tokens == len(deltas)


def test_max_tokens_truncates_with_finish_reason_length(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=2)

    assert completion.choices[0].message.content == "Hello from"
    assert completion.choices[0].finish_reason == "length"


def test_stream_options_without_stream_is_rejected_like_openai(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream_options={"include_usage": True}
        )
    assert caught.value.param == "stream_options"


def test_429_with_retry_after(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.fail(429, headers={"retry-after": "1"})
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.code == "rate_limit_exceeded" and caught.value.type == "requests"
    # One fault, one request: the next one succeeds.
    assert client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).choices


def test_500_is_an_internal_server_error(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.fail(500)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert caught.value.type == "server_error"


def test_dropped_connection(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.drop_connection()
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert fake.requests[0].status is None


def test_drop_mid_stream(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.drop_mid_stream(after_chunks=3)
    received: list[ChatCompletionChunk] = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True):
            received.append(chunk)
    assert len(received) == 3


def test_fake_sees_the_client_leave_a_hanging_stream(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.hang_stream(chunks_before_hang=2)
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    assert [next(stream), next(stream)]
    stream.close()

    assert fake.wait_for(lambda r: r.disconnected, timeout=2).status is None
    assert fake.client_disconnected.is_set()


def test_slow_first_byte_trips_the_client_timeout(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.slow_first_byte(1.0)
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.1).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    fake.wait_for(lambda r: r.disconnected, timeout=2)


def test_first_token_delay(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.first_token_delay_s = 0.05
    try:
        started = time.monotonic()
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        next(stream)
        assert time.monotonic() - started >= 0.05
        stream.close()
    finally:
        fake.first_token_delay_s = 0.0


def test_wrong_key_is_an_authentication_error(fake: FakeOpenAI) -> None:
    with (
        openai.OpenAI(base_url=fake.base_url, api_key="sk-not-the-right-key", max_retries=0) as sdk,
        pytest.raises(openai.AuthenticationError) as caught,
    ):
        sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert caught.value.code == "invalid_api_key"
    assert "Incorrect API key provided: sk-" in caught.value.message


def test_embeddings_base64_default_and_float_agree(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    default = client.embeddings.create(model="text-embedding-3-small", input=["hello world", "bye"])
    floats = client.embeddings.create(
        model="text-embedding-3-small", input=["hello world", "bye"], encoding_format="float"
    )

    assert fake.requests[0].json is not None and fake.requests[0].json["encoding_format"] == "base64"
    assert [d.embedding for d in default.data] == [d.embedding for d in floats.data]
    assert len(default.data) == 2 and len(default.data[0].embedding) == 8
    assert default.usage.prompt_tokens == default.usage.total_tokens == 3


def test_models(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    assert "gpt-4o-mini" in ids
    assert client.models.retrieve("gpt-4o").owned_by == "system"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_wait_for_requests_times_out(fake: FakeOpenAI) -> None:
    fake.reset()
    with pytest.raises(TimeoutError):
        fake.wait_for_requests(1, timeout=0.05)


def test_runs_standalone() -> None:
    """As the benchmark runs it: unscripted answers of a given length, without the collector."""
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "tests.fakes.openai_upstream", "--port", "0", "--api-key", "sk-cli"]
    command += ["--reply-pieces", "7", "--no-gc"]
    with subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        base_url = process.stdout.readline().strip()
        try:
            with openai.OpenAI(base_url=base_url, api_key="sk-cli", max_retries=0) as sdk:
                answer = sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
                assert answer.choices[0].message.content == " word" * 7
                assert answer.usage is not None and answer.usage.completion_tokens == 7
                stream = sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
                pieces = [
                    c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content
                ]
                assert pieces == [" word"] * 7
        finally:
            process.terminate()
        assert process.wait(timeout=5) == 0
