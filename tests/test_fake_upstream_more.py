"""The fake upstream's Responses, Files, Vector Stores, Conversations and Moderations endpoints, checked
against the official openai SDK used directly, with no gateway between."""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import openai
import pytest
from openai.types import ModerationImageURLInputParam
from openai.types.responses import FunctionToolParam, ResponseStreamEvent
from pydantic import BaseModel

from tests.fakes.files_api import file_content
from tests.fakes.openai_payloads import DEFAULT_CONTENT
from tests.fakes.openai_upstream import FakeOpenAI

T = TypeVar("T")
INPUT = "What is the weather in Paris?"
INPUT_TOKENS = 3 + 6  # 3 per input item + 6 words
OUTPUT_TOKENS = 6  # "Hello", " from", " the", " fake", " upstream", "."
WEATHER_TOOL: FunctionToolParam = {
    "type": "function",
    "name": "get_weather",
    "strict": True,
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"],
        "additionalProperties": False,
    },
}
STREAM_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * OUTPUT_TOKENS,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


class City(BaseModel):
    name: str
    population: int


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(background_delay_s=0.1) as server:
        yield server


@pytest.fixture
def client(fake: FakeOpenAI) -> Iterator[openai.OpenAI]:
    fake.reset()
    with openai.OpenAI(base_url=fake.base_url, api_key=fake.api_key, max_retries=0, timeout=5) as sdk:
        yield sdk


def poll(fetch: Callable[[], T], done: Callable[[T], bool], timeout: float = 3.0) -> list[T]:
    """Every value fetch() gave until done() held for one, polling briskly up to a deadline."""
    deadline, seen = time.monotonic() + timeout, []
    while True:
        seen.append(fetch())
        if done(seen[-1]):
            return seen
        if time.monotonic() > deadline:
            raise TimeoutError(f"not done after {timeout}s: {seen[-1]!r}")
        time.sleep(0.01)


# -- responses ------------------------------------------------------------------------------------------


def test_plain_response(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    raw = client.responses.with_raw_response.create(model="gpt-4.1", input=INPUT)
    response = raw.parse()

    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "completed" and response.model == "gpt-4.1-2025-04-14"
    assert response.output_text == DEFAULT_CONTENT
    [message] = response.output
    assert message.type == "message" and message.id.startswith("msg_") and message.status == "completed"
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (INPUT_TOKENS, OUTPUT_TOKENS)
    assert response.usage.total_tokens == INPUT_TOKENS + OUTPUT_TOKENS
    assert response.usage.input_tokens_details.cached_tokens == 0
    assert response.usage.input_tokens_details.cache_write_tokens == 0
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    assert response.parallel_tool_calls is True and response.tool_choice == "auto" and response.tools == []
    assert response.text is not None and response.text.format is not None
    assert response.text.format.type == "text" and response.truncation == "disabled"
    assert response.previous_response_id is None and response.background is False
    assert raw.headers["x-request-id"].startswith("req_")
    [recorded] = fake.requests
    assert recorded.usage == response.usage.model_dump(exclude_unset=True)
    assert recorded.body_size == len(recorded.body) > 0


def test_scripted_reply_with_chat_or_responses_usage(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.reply("Scripted answer", usage={"prompt_tokens": 40, "cached_tokens": 12, "reasoning_tokens": 7})
    first = client.responses.create(model="o3-mini", input=INPUT)
    fake.reply(usage={"input_tokens": 5, "output_tokens_details": {"reasoning_tokens": 3}})
    second = client.responses.create(model="o3-mini", input=INPUT)

    assert first.output_text == "Scripted answer" and first.model == "o3-mini-2025-01-31"
    assert first.usage is not None and second.usage is not None
    assert (first.usage.input_tokens, first.usage.output_tokens, first.usage.total_tokens) == (40, 2, 42)
    assert first.usage.input_tokens_details.cached_tokens == 12
    assert first.usage.output_tokens_details.reasoning_tokens == 7
    assert (second.usage.input_tokens, second.usage.total_tokens) == (5, 5 + OUTPUT_TOKENS)
    assert second.usage.output_tokens_details.reasoning_tokens == 3


def test_stream_event_sequence(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    events: list[ResponseStreamEvent] = list(
        client.responses.create(model="gpt-4o", input=INPUT, stream=True)
    )

    assert [event.type for event in events] == STREAM_EVENTS
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert "".join(deltas) == DEFAULT_CONTENT
    created, completed = events[0], events[-1]
    assert created.type == "response.created" and completed.type == "response.completed"
    assert created.response.status == "in_progress" and created.response.usage is None
    assert created.response.id == completed.response.id
    assert completed.response.output_text == DEFAULT_CONTENT
    assert completed.response.usage is not None and completed.response.usage.output_tokens == len(deltas)
    recorded = fake.wait_for(lambda r: r.status == 200)
    assert recorded.usage == completed.response.usage.model_dump(exclude_unset=True)


def test_stream_framing_has_event_lines_and_no_done(client: openai.OpenAI) -> None:
    with client.responses.with_streaming_response.create(model="gpt-4o", input=INPUT, stream=True) as raw:
        assert raw.headers["content-type"] == "text/event-stream; charset=utf-8"
        text = raw.read().decode()

    blocks = text.split("\n\n")
    assert blocks[-1] == "" and "[DONE]" not in text
    first_line, data_line = blocks[0].split("\n")
    assert first_line == "event: response.created"
    assert json.loads(data_line.removeprefix("data: "))["type"] == "response.created"
    delta = json.loads(blocks[4].split("\n")[1].removeprefix("data: "))
    assert list(delta)[:2] == ["type", "sequence_number"] and "obfuscation" in delta


def test_stream_helper_and_parse(client: openai.OpenAI) -> None:
    with client.responses.stream(model="gpt-4o-mini", input=INPUT, text_format=City) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    parsed = client.responses.parse(model="gpt-4o-mini", input=INPUT, text_format=City).output_parsed

    assert json.loads("".join(deltas)) == {"name": "example", "population": 1}
    assert final.output_parsed == parsed == City(name="example", population=1)


def test_max_output_tokens_makes_an_incomplete_response(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="gpt-4o", input=INPUT, max_output_tokens=2, stream=True))

    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.response.status == "incomplete" and last.response.output_text == "Hello from"
    assert last.response.incomplete_details is not None
    assert last.response.incomplete_details.reason == "max_output_tokens"


def test_required_function_tool(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="gpt-4.1", input=INPUT, tools=[WEATHER_TOOL], tool_choice="required"
    )

    [call] = response.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.call_id.startswith("call_") and call.id is not None and call.id.startswith("fc_")
    assert json.loads(call.arguments) == {"city": "example", "days": 1}
    assert response.output_text == ""
    assert response.tools[0].type == "function" and response.tools[0].name == "get_weather"


def test_streamed_function_call_arguments(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.reply(tool_calls=[{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}])
    with client.responses.stream(model="gpt-4.1", input=INPUT, tools=[WEATHER_TOOL]) as stream:
        fragments = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()

    assert len(fragments) > 4 and json.loads("".join(fragments)) == {"city": "Paris", "days": 3}
    [call] = final.output
    assert call.type == "function_call" and call.arguments == "".join(fragments)


def test_file_search_and_code_interpreter_items(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="gpt-4.1",
        input=INPUT,
        tools=[
            {"type": "file_search", "vector_store_ids": ["vs_never_created"]},
            {"type": "code_interpreter", "container": {"type": "auto"}},
        ],
        include=["file_search_call.results"],
    )

    search, code, message = response.output
    assert search.type == "file_search_call" and search.id.startswith("fs_")
    assert search.status == "completed" and search.queries == [INPUT]
    assert search.results is not None and search.results[0].filename == "document.pdf"
    assert code.type == "code_interpreter_call" and code.container_id.startswith("cntr_") and code.code
    assert message.type == "message" and message.content[0].type == "output_text"
    [citation] = message.content[0].annotations
    assert citation.type == "file_citation" and citation.index == len(DEFAULT_CONTENT)
    assert response.tools[0].type == "file_search" and response.tools[0].vector_store_ids == [
        "vs_never_created"
    ]


def test_file_search_stream_events(client: openai.OpenAI) -> None:
    tools: list[openai.types.responses.ToolParam] = [{"type": "file_search", "vector_store_ids": ["vs_x"]}]
    with client.responses.stream(model="gpt-4.1", input=INPUT, tools=tools) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_response()

    assert types[2:7] == [
        "response.output_item.added",
        "response.file_search_call.in_progress",
        "response.file_search_call.searching",
        "response.file_search_call.completed",
        "response.output_item.done",
    ]
    assert "response.output_text.annotation.added" in types
    assert [item.type for item in final.output] == ["file_search_call", "message"]


def test_background_response_is_polled_until_completed(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    queued = client.responses.create(model="gpt-4o", input=INPUT, background=True)
    assert queued.status == "queued" and queued.usage is None and queued.output == []

    seen = poll(lambda: client.responses.retrieve(queued.id), lambda r: r.status == "completed")

    statuses = [r.status for r in seen]
    ranks = [["queued", "in_progress", "completed"].index(str(status)) for status in statuses]
    assert ranks == sorted(ranks) and statuses[-1] == "completed"
    assert all(r.usage is None and r.output == [] for r in seen[:-1])
    done = seen[-1]
    assert done.output_text == DEFAULT_CONTENT and done.background is True
    assert done.usage is not None and done.usage.total_tokens == INPUT_TOKENS + OUTPUT_TOKENS
    # Retrieving a done response again still shows its usage: a gateway must meter it once, not per poll.
    assert client.responses.retrieve(queued.id).usage == done.usage
    assert fake.polls(queued.id) == len(seen) + 1
    polled = [r for r in fake.requests if r.method == "GET"]
    assert [r.usage is not None for r in polled] == [False] * (len(seen) - 1) + [True, True]
    assert fake.requests[0].usage is None  # the POST that queued it


def test_cancel_and_delete(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.background_delay_s = 60.0
    try:
        queued = client.responses.create(model="gpt-4o", input=INPUT, background=True)
    finally:
        fake.background_delay_s = 0.1
    cancelled = client.responses.cancel(queued.id)
    assert cancelled.status == "cancelled" and client.responses.retrieve(queued.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(client.responses.create(model="gpt-4o", input=INPUT).id)

    client.responses.delete(queued.id)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.retrieve(queued.id)
    assert caught.value.message.endswith(f"Response with id '{queued.id}' not found.")


def test_previous_response_id(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    first = client.responses.create(model="gpt-4o", input=INPUT)
    second = client.responses.create(model="gpt-4o", input="And tomorrow?", previous_response_id=first.id)

    assert second.previous_response_id == first.id
    assert first.usage is not None and second.usage is not None
    # The previous turn is billed again as input.
    assert second.usage.input_tokens == first.usage.total_tokens + 3 + 2
    assert fake.requests[1].json is not None and fake.requests[1].json["previous_response_id"] == first.id

    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model="gpt-4o", input=INPUT, previous_response_id="resp_missing")
    assert caught.value.message.endswith("Previous response with id 'resp_missing' not found.")
    assert caught.value.param == "previous_response_id"
    unstored = client.responses.create(model="gpt-4o", input=INPUT, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_conversation(client: openai.OpenAI) -> None:
    conversation = client.conversations.create(items=[{"role": "user", "content": "Hello there"}])
    assert conversation.id.startswith("conv_") and conversation.object == "conversation"
    assert client.conversations.retrieve(conversation.id).id == conversation.id

    response = client.responses.create(model="gpt-4o", input=INPUT, conversation=conversation.id)
    assert response.conversation is not None and response.conversation.id == conversation.id
    assert response.usage is not None and response.usage.input_tokens == INPUT_TOKENS + 3 + 2
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-4o", input=INPUT, conversation="conv_missing")


def test_faults_apply_to_responses(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.fail(429, headers={"retry-after-ms": "20"})
    with pytest.raises(openai.RateLimitError) as caught:
        client.responses.create(model="gpt-4o", input=INPUT)
    assert caught.value.response.headers["retry-after-ms"] == "20"

    fake.drop_mid_stream(after_chunks=5)
    received: list[ResponseStreamEvent] = []
    with pytest.raises(openai.APIConnectionError):
        received.extend(client.responses.create(model="gpt-4o", input=INPUT, stream=True))
    assert [event.type for event in received] == STREAM_EVENTS[:5]

    fake.hang_stream(chunks_before_hang=2)
    stream = client.responses.create(model="gpt-4o", input=INPUT, stream=True)
    assert [next(stream).type, next(stream).type] == STREAM_EVENTS[:2]
    stream.close()
    assert fake.wait_for(lambda r: r.disconnected, timeout=2).status is None
    assert client.responses.create(model="gpt-4o", input=INPUT).status == "completed"


# -- files, vector stores, moderations, models ----------------------------------------------------------


def test_large_upload_is_streamed_and_hashed(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    data = random.Random(7).randbytes(6 * 1024 * 1024 + 123)
    uploaded = client.files.create(file=("notes.bin", data, "application/octet-stream"), purpose="user_data")

    assert uploaded.id.startswith("file-") and uploaded.object == "file" and uploaded.status == "processed"
    assert (uploaded.bytes, uploaded.filename, uploaded.purpose) == (len(data), "notes.bin", "user_data")
    [recorded] = fake.requests
    assert recorded.body == b"" and recorded.json is None
    assert recorded.upload_size == len(data) and recorded.upload_filename == "notes.bin"
    assert recorded.upload_sha256 == hashlib.sha256(data).hexdigest()
    assert recorded.form == {"purpose": "user_data"}
    assert recorded.body_size == int(recorded.headers["content-length"]) > len(data)
    with fake.store.lock:
        assert fake.store.files[uploaded.id].sha256 == recorded.upload_sha256

    assert client.files.retrieve(uploaded.id) == uploaded
    assert [f.id for f in client.files.list(purpose="user_data")] == [uploaded.id]
    assert list(client.files.list(purpose="batch")) == []
    content = client.files.content(uploaded.id).read()
    assert len(content) == len(data) and content == b"".join(
        file_content(hashlib.sha256(data).hexdigest(), len(data))
    )
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_upload_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("a.txt", b"x"), purpose="nonsense")  # type: ignore[arg-type]
    assert caught.value.param == "purpose"


def test_document_question_answering_flow(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    document = client.files.create(file=("handbook.pdf", b"%PDF-1.7 " * 1000), purpose="assistants")
    vector_store = client.vector_stores.create(name="Handbook")
    assert vector_store.id.startswith("vs_") and vector_store.file_counts.total == 0

    attached = client.vector_stores.files.create(vector_store_id=vector_store.id, file_id=document.id)
    assert attached.status == "in_progress" and attached.vector_store_id == vector_store.id
    ready = client.vector_stores.files.create_and_poll(vector_store_id=vector_store.id, file_id=document.id)
    assert ready.status == "completed" and ready.usage_bytes == document.bytes
    store = client.vector_stores.retrieve(vector_store.id)
    assert store.status == "completed" and store.file_counts.completed == 1
    assert store.usage_bytes == document.bytes
    assert [s.id for s in client.vector_stores.list()] == [vector_store.id]
    assert [f.id for f in client.vector_stores.files.list(vector_store.id)] == [document.id]

    response = client.responses.create(
        model="gpt-4.1",
        input="What does the handbook say about holidays?",
        tools=[{"type": "file_search", "vector_store_ids": [vector_store.id]}],
    )
    search, message = response.output
    assert search.type == "file_search_call" and search.results is None
    assert message.type == "message" and message.content[0].type == "output_text"
    [citation] = message.content[0].annotations
    assert citation.type == "file_citation"
    assert (citation.file_id, citation.filename) == (document.id, "handbook.pdf")
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.files.create(vector_store_id=vector_store.id, file_id="file-missing")


def test_vector_store_ingestion_takes_time(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    document = client.files.create(file=("a.txt", b"hello"), purpose="assistants")
    fake.ingest_delay_s = 0.05
    try:
        store = client.vector_stores.create(name="slow", file_ids=[document.id])
        assert store.status == "in_progress" and store.file_counts.in_progress == 1
        seen = poll(lambda: client.vector_stores.retrieve(store.id), lambda s: s.status == "completed")
    finally:
        fake.ingest_delay_s = 0.0
    assert seen[-1].file_counts.completed == 1 and seen[-1].usage_bytes == 5


def test_moderations(client: openai.OpenAI) -> None:
    moderation = client.moderations.create(input=["I love kittens", "and puppies"])

    assert moderation.id.startswith("modr-") and moderation.model == "omni-moderation-2024-09-26"
    assert len(moderation.results) == 2
    result = moderation.results[0]
    assert result.flagged is False and result.categories.self_harm_intent is False
    assert 0 < result.category_scores.violence < 0.001
    assert result.category_applied_input_types.violence == ["text"]
    picture: ModerationImageURLInputParam = {
        "type": "image_url",
        "image_url": {"url": "https://x.test/cat.png"},
    }
    image = client.moderations.create(model="omni-moderation-latest", input=[picture])
    assert image.results[0].category_applied_input_types.violence == ["image"]
    assert image.results[0].category_applied_input_types.hate == []


def test_models_list_can_be_filtered(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]

    for name in ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "text-embedding-3-small", "o3-mini", "other-model"):
        assert name in ids
    assert [i for i in ids if i.startswith("gpt-")] and "other-model" not in [i for i in ids if "gpt" in i]
    assert client.models.retrieve("other-model").id == "other-model"


# -- batches --------------------------------------------------------------------------------------------


def test_batch_runs_its_input_lines_into_output_and_error_files(
    client: openai.OpenAI, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fake, "job_delay_s", 0.4)
    lines = [
        {
            "custom_id": "ok-1",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini"},
        },
        {"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "fail-x"}},
        {
            "custom_id": "ok-2",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini"},
        },
    ]
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    uploaded = client.files.create(file=("in.jsonl", content), purpose="batch")
    assert client.files.content(uploaded.id).read() == content
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    seen = poll(lambda: client.batches.retrieve(batch.id), lambda b: b.status == "completed")
    statuses = [b.status for b in seen]
    assert statuses[0] == "validating"
    order = ["validating", "in_progress", "finalizing", "completed"]
    assert sorted(set(statuses), key=order.index) == [s for s in order if s in statuses]
    done = seen[-1]
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (3, 2, 1)
    assert done.output_file_id and done.error_file_id and done.completed_at
    output = [json.loads(x) for x in client.files.content(done.output_file_id).read().splitlines()]
    errors = [json.loads(x) for x in client.files.content(done.error_file_id).read().splitlines()]
    assert [line["custom_id"] for line in output] == ["ok-1", "ok-2"]
    for line in output:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "chat.completion" and body["usage"]["total_tokens"] > 0
    (error,) = errors
    assert error["custom_id"] == "bad"
    assert error["response"]["status_code"] == 404
    assert error["response"]["body"]["error"]["code"] == "model_not_found"


def test_batch_without_request_lines_fails(client: openai.OpenAI) -> None:
    uploaded = client.files.create(file=("in.jsonl", b"not json\n"), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "failed" and batch.failed_at
    assert batch.errors is not None and batch.errors.data
    assert batch.errors.data[0].code == "empty_file"
    assert batch.output_file_id is None
