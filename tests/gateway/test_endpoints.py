"""Embeddings, the Responses API (plain, stream, tools, background), the model list and the /v1/*
passthrough, through the gateway with the official SDK — each metered like chat."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from tests.db import fetch, usage_rows, wait_for_rows
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, GatewayProcess, ThreadedGateway, wait_until

AUTH = {"authorization": f"Bearer {MASTER_KEY}"}


def rid() -> str:
    return f"ep-{uuid.uuid4().hex}"


def test_embeddings_are_relayed_and_metered(
    client: openai.OpenAI, fake: FakeOpenAI, database_url: str
) -> None:
    request_id = rid()
    result = client.embeddings.create(
        model="text-embedding-3-small",
        input=["first text here", "second"],
        extra_headers={"X-Request-Id": request_id, "X-Feature": "search-index"},
    )
    assert len(result.data) == 2
    assert len(result.data[0].embedding) > 0
    (row,) = wait_for_rows(database_url, request_id)
    assert row["endpoint"] == "/v1/embeddings"
    assert row["prompt_tokens"] == result.usage.prompt_tokens == 4
    assert row["completion_tokens"] == 0
    assert row["feature"] == "search-index"
    assert row["usage_source"] == "upstream"
    assert row["cost_usd"] is not None


def test_embeddings_need_input(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/embeddings", body={"model": "text-embedding-3-small"}, cast_to=object)
    assert caught.value.param == "input"
    assert fake.requests == []


def test_responses_plain_are_metered_with_responses_usage(
    client: openai.OpenAI, fake: FakeOpenAI, database_url: str
) -> None:
    request_id = rid()
    fake.reply(
        "The answer is 42.",
        usage={"input_tokens": 120, "output_tokens": 30, "cached_tokens": 100, "reasoning_tokens": 12},
    )
    response = client.responses.create(
        model="gpt-4o-mini", input="What is the answer?", extra_headers={"X-Request-Id": request_id}
    )
    assert response.output_text == "The answer is 42."
    (row,) = wait_for_rows(database_url, request_id)
    assert row["endpoint"] == "/v1/responses"
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (120, 30, 150)
    assert (row["cached_tokens"], row["reasoning_tokens"]) == (100, 12)
    assert row["upstream_model"] == "gpt-4o-mini-2024-07-18"


def test_responses_stream_is_relayed_event_by_event(
    client: openai.OpenAI, fake: FakeOpenAI, database_url: str
) -> None:
    request_id = rid()
    fake.reply("streamed response text", usage={"input_tokens": 11, "output_tokens": 3})
    events = list(
        client.responses.create(
            model="gpt-4o", input="stream please", stream=True, extra_headers={"X-Request-Id": request_id}
        )
    )
    types = [event.type for event in events]
    assert types[0] == "response.created"
    assert types[-1] == "response.completed"
    assert "response.output_text.delta" in types
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == "streamed response text"
    (row,) = wait_for_rows(database_url, request_id)
    assert row["stream"] is True
    assert (row["prompt_tokens"], row["completion_tokens"]) == (11, 3)
    assert row["usage_source"] == "upstream"


def test_responses_stream_helper(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.reply("helper works")
    with client.responses.stream(model="gpt-4o", input="hi") as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "helper works"
    assert final.output_text == "helper works"


def test_responses_file_search_and_previous_response(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    store = client.vector_stores.create(name="handbook")
    uploaded = client.files.create(file=("handbook.pdf", b"%PDF-1.4 policies"), purpose="user_data")
    client.vector_stores.files.create(vector_store_id=store.id, file_id=uploaded.id)
    first = client.responses.create(
        model="gpt-4o-mini",
        input="What is the leave policy?",
        tools=[{"type": "file_search", "vector_store_ids": [store.id]}],
    )
    kinds = [item.type for item in first.output]
    assert kinds == ["file_search_call", "message"]
    follow_up = client.responses.create(
        model="gpt-4o-mini", input="And for contractors?", previous_response_id=first.id
    )
    assert follow_up.previous_response_id == first.id
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-4o-mini", input="x", previous_response_id="resp_does_not_exist")


def test_background_response_is_metered_once_when_complete(
    client: openai.OpenAI, fake: FakeOpenAI, database_url: str
) -> None:
    fake.reply("done in the background", usage={"input_tokens": 50, "output_tokens": 20})
    created = client.responses.create(
        model="gpt-4o-mini",
        input="long job",
        background=True,
        extra_headers={"X-Feature": "reports", "X-User-Id": "owner-1"},
    )
    assert created.status in ("queued", "in_progress")
    assert usage_rows(database_url, created.id) == []

    def completed() -> bool:
        # Polls carry no attribution of their own: the row is the creator's.
        return client.responses.retrieve(created.id).status == "completed"

    wait_until(completed, timeout=10, interval=0.02)
    for _ in range(3):
        assert client.responses.retrieve(created.id).status == "completed"
    assert fake.polls(created.id) >= 4
    (row,) = wait_for_rows(database_url, created.id)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (50, 20)
    assert (row["feature"], row["user_id"]) == ("reports", "owner-1")
    assert row["endpoint"] == "/v1/responses"
    # Nothing else was metered for this response: not the creation, not the other polls.
    (count,) = fetch(database_url, "SELECT COUNT(*) AS n FROM usage_events WHERE feature = 'reports'")
    assert count["n"] == 1


def test_files_passthrough_streams_a_large_upload(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    content = hashlib.sha256(b"seed").digest() * (8 * 1024 * 1024 // 32)  # 8 MiB
    uploaded = client.files.create(file=("big.jsonl", content), purpose="batch")
    assert uploaded.bytes == len(content)
    record = fake.wait_for(lambda request: request.path == "/v1/files" and request.method == "POST")
    assert record.upload_size == len(content)
    assert record.upload_sha256 == hashlib.sha256(content).hexdigest()
    assert record.form == {"purpose": "batch"}
    assert record.headers["authorization"] == f"Bearer {fake.api_key}"
    listed = client.files.list()
    assert uploaded.id in [f.id for f in listed.data]
    downloaded = client.files.content(uploaded.id).read()
    assert len(downloaded) == len(content)
    client.files.delete(uploaded.id)


def test_passthrough_retries_idempotent_calls_only(gateway: ThreadedGateway, fake: FakeOpenAI) -> None:
    fake.fail(503, headers={"retry-after-ms": "1"}, method="GET")
    response = httpx.get(gateway.base_url + "/files", headers=AUTH)
    assert response.status_code == 200
    assert response.headers["x-gateway-attempts"] == "2"
    fake.reset()
    fake.fail(503, headers={"retry-after-ms": "1"})
    response = httpx.post(gateway.base_url + "/moderations", json={"input": "x"}, headers=AUTH)
    # A POST that reached the upstream is not sent twice.
    assert response.status_code == 503
    assert len(fake.requests) == 1


def test_passthrough_keeps_auth_and_attribution_rules(gateway: ThreadedGateway, fake: FakeOpenAI) -> None:
    assert httpx.get(gateway.base_url + "/files").status_code == 401
    response = httpx.get(gateway.base_url + "/files", headers={**AUTH, "x-feature": "x" * 200})
    assert response.status_code == 400
    response = httpx.post(
        gateway.base_url + "/moderations",
        json={"input": "fine"},
        headers={**AUTH, "x-feature": "mod", "x-user-id": "u1"},
    )
    assert response.status_code == 200
    sent = fake.requests[-1].headers
    assert "x-feature" not in sent and "x-user-id" not in sent
    assert sent["authorization"] == f"Bearer {fake.api_key}"


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_large_upload_and_download_pass_with_bounded_gateway_memory(
    fake_server: FakeOpenAI, database_url: str, tmp_path: Path
) -> None:
    fake_server.reset()
    gateway = GatewayProcess(fake_server, database_url, tmp_path).start()
    size = 64 * 1024 * 1024
    content = os.urandom(1024 * 1024) * 64
    try:
        assert gateway.proc is not None
        with openai.OpenAI(
            base_url=gateway.url + "/v1", api_key=MASTER_KEY, max_retries=0, timeout=120
        ) as sdk:
            sdk.files.list()  # warm up: imports, pools, first allocations
            # The peak so far is start-up's (building the tokenizers' tables); from here it is the transfer's.
            Path(f"/proc/{gateway.proc.pid}/clear_refs").write_text("5")
            before = _peak_rss_kib(gateway.proc.pid)
            uploaded = sdk.files.create(file=("big.bin", content), purpose="user_data")
            downloaded = 0
            with sdk.files.with_streaming_response.content(uploaded.id) as response:
                for chunk in response.iter_bytes():
                    downloaded += len(chunk)
            after = _peak_rss_kib(gateway.proc.pid)
        record = fake_server.wait_for(lambda r: r.path == "/v1/files" and r.method == "POST")
        assert record.upload_size == size
        assert record.upload_sha256 == hashlib.sha256(content).hexdigest()
        assert downloaded == size
        # 64 MiB went up and 64 MiB came down; held whole, either would have grown the peak by 64 MiB. The
        # upstream client reads up to ~800 KiB at a time and keeps some chunks in flight each way: about
        # 15-25 MiB whatever the size (the same with 256 MiB).
        assert after - before < 32 * 1024, f"peak RSS grew by {(after - before) // 1024} MiB"
    finally:
        gateway.stop()


def test_passthrough_answer_with_usage_is_metered(
    client: openai.OpenAI, fake: FakeOpenAI, database_url: str
) -> None:
    request_id = rid()
    completion = client.completions.create(
        model="gpt-3.5-turbo-instruct",
        prompt="four words of prompt",
        extra_headers={"X-Request-Id": request_id, "X-Feature": "legacy"},
    )
    assert completion.choices[0].text == "a legacy completion"
    (row,) = wait_for_rows(database_url, request_id)
    assert row["endpoint"] == "/v1/completions"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (4, 3)
    assert row["model"] == "gpt-3.5-turbo-instruct"
    assert row["feature"] == "legacy"
    # An answer without usage (moderations) is passed through and not metered.
    moderation_id = rid()
    client.moderations.create(input="fine", extra_headers={"X-Request-Id": moderation_id})
    # A metered call after it: once its row is in, the recorder has flushed past the moderation.
    marker = rid()
    client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "x"}], extra_headers={"X-Request-Id": marker}
    )
    wait_for_rows(database_url, marker)
    assert usage_rows(database_url, moderation_id) == []


def test_responses_in_a_conversation(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    conversation = client.conversations.create()
    first = client.responses.create(model="gpt-4o-mini", input="remember 7", conversation=conversation.id)
    second = client.responses.create(model="gpt-4o-mini", input="what number?", conversation=conversation.id)
    assert first.output_text and second.output_text
    sent = [r.json for r in fake.requests if r.path == "/v1/responses"]
    assert [body["conversation"] for body in sent] == [conversation.id, conversation.id]
