"""Objects the upstream keeps belong to the gateway key that created them: another key gets OpenAI's 404
for them (and nothing of its call reaches the upstream), lists show each key its own, the master key sees
everything. Two keys, A and B, through a real gateway and the fake upstream."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import sdk_client
from tests.db import database_down, database_up, fetch
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, ThreadedGateway, wait_until

MASTER = {"authorization": f"Bearer {MASTER_KEY}"}
JSONL = b'{"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'
HELLO: list[Any] = [{"role": "user", "content": "Hello"}]


@dataclass
class Key:
    id: str
    secret: str
    gateway: ThreadedGateway

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.secret}"}

    def sdk(self) -> openai.OpenAI:
        return sdk_client(self.gateway.base_url, api_key=self.secret)

    def call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        return httpx.request(
            method, self.gateway.base_url + path, json=body, headers=self.headers, timeout=10
        )


def make_key(gateway: ThreadedGateway, **spec: Any) -> Key:
    """A key that may call every endpoint class: what is under test here is ownership, not scopes."""
    body = {"name": f"own-{uuid.uuid4().hex[:6]}", "scopes": ["*"], **spec}
    response = httpx.post(gateway.url + "/admin/keys", json=body, headers=MASTER)
    assert response.status_code == 201, response.text
    created = response.json()
    return Key(created["id"], created["secret"], gateway)


@pytest.fixture
def keys(gateway: ThreadedGateway) -> tuple[Key, Key, Key]:
    """A and B, and the master key in the same shape."""
    return make_key(gateway, default_feature="search"), make_key(gateway), Key("master", MASTER_KEY, gateway)


@dataclass
class Objects:
    """One of everything, made by one key."""

    file: str
    batch: str
    vector_store: str
    response: str
    conversation: str
    job: str
    upload: str
    completion: str  # a stored chat completion


def create_everything(key: Key) -> Objects:
    with key.sdk() as sdk:
        file = sdk.files.create(file=("requests.jsonl", JSONL), purpose="batch").id
        batch = sdk.batches.create(
            input_file_id=file, endpoint="/v1/chat/completions", completion_window="24h"
        ).id
        vector_store = sdk.vector_stores.create(name="docs", file_ids=[file]).id
        response = sdk.responses.create(model="gpt-4o-mini", input="Remember 42.").id
        conversation = sdk.conversations.create(metadata={"topic": "x"}).id
        job = sdk.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=file).id
        upload = sdk.uploads.create(bytes=10, filename="a.jsonl", mime_type="text/jsonl", purpose="batch").id
        completion = sdk.chat.completions.create(model="gpt-4o-mini", messages=HELLO, store=True).id
    return Objects(file, batch, vector_store, response, conversation, job, upload, completion)


def forbidden_calls(theirs: Objects, own_file: str, own_store: str) -> list[tuple[str, str, Any]]:
    """Every way of reaching another key's objects: by path, and by naming them in a body."""
    t = theirs
    return [
        ("GET", f"/files/{t.file}", None),
        ("GET", f"/files/{t.file}/content", None),
        ("DELETE", f"/files/{t.file}", None),
        ("GET", f"/batches/{t.batch}", None),
        ("POST", f"/batches/{t.batch}/cancel", None),
        ("GET", f"/vector_stores/{t.vector_store}", None),
        ("POST", f"/vector_stores/{t.vector_store}", {"name": "mine now"}),
        ("DELETE", f"/vector_stores/{t.vector_store}", None),
        ("GET", f"/vector_stores/{t.vector_store}/files", None),
        ("GET", f"/vector_stores/{t.vector_store}/files/{t.file}", None),
        ("POST", f"/vector_stores/{t.vector_store}/files", {"file_id": own_file}),
        ("POST", f"/vector_stores/{t.vector_store}/search", {"query": "42"}),
        ("GET", f"/responses/{t.response}", None),
        ("DELETE", f"/responses/{t.response}", None),
        ("GET", f"/responses/{t.response}/input_items", None),
        ("POST", f"/responses/{t.response}/cancel", None),
        ("GET", f"/conversations/{t.conversation}", None),
        ("POST", f"/conversations/{t.conversation}", {"metadata": {"topic": "y"}}),
        ("DELETE", f"/conversations/{t.conversation}", None),
        ("GET", f"/conversations/{t.conversation}/items", None),
        ("GET", f"/fine_tuning/jobs/{t.job}", None),
        ("POST", f"/fine_tuning/jobs/{t.job}/cancel", None),
        ("GET", f"/fine_tuning/jobs/{t.job}/events", None),
        ("POST", f"/uploads/{t.upload}/cancel", None),
        ("POST", f"/uploads/{t.upload}/complete", {"part_ids": []}),
        ("GET", f"/chat/completions/{t.completion}", None),
        ("POST", f"/chat/completions/{t.completion}", {"metadata": {"topic": "y"}}),
        ("DELETE", f"/chat/completions/{t.completion}", None),
        ("GET", f"/chat/completions/{t.completion}/messages", None),
        # Bodies naming their objects.
        ("POST", "/responses", {"model": "gpt-4o-mini", "input": "and?", "previous_response_id": t.response}),
        ("POST", "/responses", {"model": "gpt-4o-mini", "input": "and?", "conversation": t.conversation}),
        (
            "POST",
            "/responses",
            {"model": "gpt-4o-mini", "input": "x", "conversation": {"id": t.conversation}},
        ),
        (
            "POST",
            "/responses",
            {
                "model": "gpt-4o-mini",
                "input": [{"role": "user", "content": [{"type": "input_file", "file_id": t.file}]}],
            },
        ),
        (
            "POST",
            "/responses",
            {
                "model": "gpt-4o-mini",
                "input": "find it",
                "tools": [{"type": "file_search", "vector_store_ids": [t.vector_store]}],
            },
        ),
        (
            "POST",
            "/chat/completions",
            {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": t.file}}]}],
            },
        ),
        (
            "POST",
            "/batches",
            {"input_file_id": t.file, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        ),
        ("POST", "/fine_tuning/jobs", {"model": "gpt-4o-mini", "training_file": t.file}),
        (
            "POST",
            "/fine_tuning/jobs",
            {"model": "gpt-4o-mini", "training_file": own_file, "validation_file": t.file},
        ),
        ("POST", "/vector_stores", {"name": "copy", "file_ids": [own_file, t.file]}),
        ("POST", f"/vector_stores/{own_store}/files", {"file_id": t.file}),
        ("POST", f"/vector_stores/{own_store}/file_batches", {"file_ids": [t.file]}),
        ("POST", f"/vector_stores/{own_store}/file_batches", {"files": [{"file_id": t.file}]}),
        (
            "POST",
            "/conversations",
            {"items": [{"role": "user", "content": [{"type": "input_file", "file_id": t.file}]}]},
        ),
    ]


def test_another_key_gets_404_and_nothing_reaches_the_upstream(
    keys: tuple[Key, Key, Key], fake: FakeOpenAI
) -> None:
    a, b, master = keys
    theirs = create_everything(a)
    with b.sdk() as sdk:
        own_file = sdk.files.create(file=("mine.jsonl", JSONL), purpose="batch").id
        own_store = sdk.vector_stores.create(name="mine").id
    seen = len(fake.requests)
    for method, path, body in forbidden_calls(theirs, own_file, own_store):
        response = b.call(method, path, body)
        assert response.status_code == 404, (method, path, response.text)
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error", (method, path)
        assert any(value in error["message"] for value in vars(theirs).values()), (path, error)
    assert len(fake.requests) == seen, [(r.method, r.path) for r in fake.requests[seen:]]
    # Nothing of A's was changed or deleted, and A and the master still reach all of it.
    assert fake.store.files[theirs.file] and fake.store.responses[theirs.response]
    assert fake.store.vector_stores[theirs.vector_store].name == "docs"
    assert fake.store.conversations[theirs.conversation].metadata == {"topic": "x"}
    assert fake.store.chat_completions[theirs.completion].metadata == {}
    for key in (a, master):
        for path in (
            f"/files/{theirs.file}",
            f"/files/{theirs.file}/content",
            f"/batches/{theirs.batch}",
            f"/vector_stores/{theirs.vector_store}",
            f"/vector_stores/{theirs.vector_store}/files",
            f"/responses/{theirs.response}",
            f"/responses/{theirs.response}/input_items",
            f"/conversations/{theirs.conversation}",
            f"/fine_tuning/jobs/{theirs.job}",
            f"/fine_tuning/jobs/{theirs.job}/events",
            f"/chat/completions/{theirs.completion}",
            f"/chat/completions/{theirs.completion}/messages",
        ):
            assert key.call("GET", path).status_code == 200, (key.id, path)
    continued = a.call(
        "POST",
        "/responses",
        {"model": "gpt-4o-mini", "input": "and?", "previous_response_id": theirs.response},
    )
    assert continued.status_code == 200, continued.text


def test_the_sdk_sees_not_found(keys: tuple[Key, Key, Key]) -> None:
    a, b, _ = keys
    with a.sdk() as sdk:
        file = sdk.files.create(file=("a.jsonl", JSONL), purpose="batch")
    with b.sdk() as sdk, pytest.raises(openai.NotFoundError) as caught:
        sdk.files.retrieve(file.id)
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["message"] == f"No such File object: {file.id}"
    with b.sdk() as sdk, pytest.raises(openai.NotFoundError) as caught:
        sdk.responses.create(model="gpt-4o-mini", input="x", previous_response_id="resp_" + "0" * 50)
    assert caught.value.code == "previous_response_not_found"


def test_owners_are_recorded_with_key_and_feature(keys: tuple[Key, Key, Key], database_url: str) -> None:
    a, _, _ = keys
    made = create_everything(a)
    with a.sdk() as sdk:
        tagged = sdk.files.create(
            file=("t.jsonl", JSONL), purpose="batch", extra_headers={"X-Feature": "ingest"}
        ).id
    rows = fetch(database_url, "SELECT * FROM resource_owners WHERE api_key_id = $1", a.id)
    kinds = {row["resource_id"]: (row["kind"], row["feature"]) for row in rows}
    assert kinds == {
        made.file: ("file", "search"),
        made.batch: ("batch", "search"),
        made.vector_store: ("vector_store", "search"),
        made.response: ("response", "search"),
        made.conversation: ("conversation", "search"),
        made.job: ("fine_tuning.job", "search"),
        made.upload: ("upload", "search"),
        made.completion: ("chat.completion", "search"),
        tagged: ("file", "ingest"),
    }


def test_unstored_responses_and_the_masters_objects_are_not_recorded(
    keys: tuple[Key, Key, Key], database_url: str
) -> None:
    a, b, master = keys
    with a.sdk() as sdk:
        unstored = sdk.responses.create(model="gpt-4o-mini", input="x", store=False).id
        unstored_chat = sdk.chat.completions.create(model="gpt-4o-mini", messages=HELLO).id
    with master.sdk() as sdk:
        masters = sdk.files.create(file=("m.jsonl", JSONL), purpose="batch").id
    found = fetch(
        database_url,
        "SELECT * FROM resource_owners WHERE resource_id = ANY($1::text[])",
        [unstored, unstored_chat, masters],
    )
    assert found == []
    # The master's objects are no gateway key's.
    for key in (a, b):
        assert key.call("GET", f"/files/{masters}").status_code == 404
    assert master.call("GET", f"/files/{masters}").status_code == 200


def test_lists_show_each_key_its_own_and_the_master_everything(
    keys: tuple[Key, Key, Key], fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, master = keys
    monkeypatch.setattr(fake, "job_delay_s", 60.0)  # no batch output files to list
    made = {key.id: create_everything(key) for key in (a, b)}
    lists: dict[str, Callable[[openai.OpenAI], list[str]]] = {
        "file": lambda sdk: [f.id for f in sdk.files.list()],
        "batch": lambda sdk: [x.id for x in sdk.batches.list()],
        "vector_store": lambda sdk: [x.id for x in sdk.vector_stores.list()],
        "job": lambda sdk: [x.id for x in sdk.fine_tuning.jobs.list()],
        "completion": lambda sdk: [x.id for x in sdk.chat.completions.list()],
    }
    for key in (a, b):
        with key.sdk() as sdk:
            for kind, listed in lists.items():
                assert listed(sdk) == [getattr(made[key.id], kind)], (key.id, kind)
            store = made[key.id].vector_store
            assert [f.id for f in sdk.vector_stores.files.list(store)] == [made[key.id].file]
    with master.sdk() as sdk:
        for kind, listed in lists.items():
            assert set(listed(sdk)) >= {getattr(made[key.id], kind) for key in (a, b)}, kind


def test_paging_walks_past_other_keys_objects(keys: tuple[Key, Key, Key]) -> None:
    a, b, _ = keys
    with a.sdk() as sdk:
        mine = [sdk.files.create(file=(f"a{i}.jsonl", JSONL), purpose="batch").id for i in range(3)]
    with b.sdk() as sdk:
        for i in range(7):  # newer: the upstream's first pages are all B's
            sdk.files.create(file=(f"b{i}.jsonl", JSONL), purpose="batch")
    with a.sdk() as sdk:
        first = sdk.files.list(limit=2)
        walked = [f.id for f in sdk.files.list(limit=2)]
    # Four upstream pages of two read for the first one: a page holds the caller's objects only, fewer
    # than `limit` here, and its cursor is its own last object.
    assert [f.id for f in first.data] == [mine[2]]
    assert first.has_more is True and first.last_id == mine[2]
    assert walked == mine[::-1]
    last = a.call("GET", f"/files?limit=2&after={mine[0]}").json()
    assert last["data"] == [] and last["has_more"] is False and last["last_id"] is None


def test_an_empty_page_that_is_not_the_end_keeps_a_cursor(keys: tuple[Key, Key, Key]) -> None:
    a, b, _ = keys
    with a.sdk() as sdk:
        mine = sdk.files.create(file=("a.jsonl", JSONL), purpose="batch").id
    with b.sdk() as sdk:
        for i in range(12):
            sdk.files.create(file=(f"b{i}.jsonl", JSONL), purpose="batch")
    # Ten upstream pages of one of B's files each, then the gateway answers what it has: nothing yet.
    page = a.call("GET", "/files?limit=1").json()
    assert page["data"] == [] and page["has_more"] is True and page["last_id"] is not None
    following = a.call("GET", f"/files?limit=1&after={page['last_id']}").json()
    assert [f["id"] for f in following["data"]] == [mine]


def test_derived_files_belong_to_the_owner(
    keys: tuple[Key, Key, Key], fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's output file, a fine-tuning job's result file and a completed upload's file."""
    a, b, _ = keys
    monkeypatch.setattr(fake, "job_delay_s", 0.05)
    with a.sdk() as sdk:
        file = sdk.files.create(file=("in.jsonl", JSONL), purpose="batch").id
        batch = sdk.batches.create(
            input_file_id=file, endpoint="/v1/chat/completions", completion_window="24h"
        )
        job = sdk.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=file)
        output = wait_until(lambda: sdk.batches.retrieve(batch.id).output_file_id, timeout=5)
        results = wait_until(lambda: sdk.fine_tuning.jobs.retrieve(job.id).result_files, timeout=5)
        upload = sdk.uploads.create(
            bytes=len(JSONL), filename="u.jsonl", mime_type="text/jsonl", purpose="batch"
        )
        part = sdk.uploads.parts.create(upload.id, data=JSONL)
        completed = sdk.uploads.complete(upload.id, part_ids=[part.id])
        assert completed.file is not None
        derived = [output, *results, completed.file.id]
        for file_id in derived:
            assert sdk.files.content(file_id).read(), file_id
        assert set(derived) <= {f.id for f in sdk.files.list()}
    for file_id in derived:
        assert b.call("GET", f"/files/{file_id}/content").status_code == 404
    with b.sdk() as sdk:
        assert not set(derived) & {f.id for f in sdk.files.list()}


@pytest.mark.parametrize("background", [False, True])
def test_streamed_responses_are_recorded_before_the_client_sees_them(
    keys: tuple[Key, Key, Key], background: bool
) -> None:
    a, b, _ = keys
    with a.sdk() as sdk:
        with sdk.responses.stream(model="gpt-4o-mini", input="Tell me", background=background) as stream:
            created = next(event for event in stream if event.type == "response.created")
            response_id = created.response.id
            # Retrievable by its owner (and no one else) while the stream is still open.
            assert b.call("GET", f"/responses/{response_id}").status_code == 404
            final = stream.get_final_response()
        assert final.id == response_id
        assert sdk.responses.retrieve(response_id).status == "completed"


@pytest.mark.parametrize("stream", [False, True])
def test_stored_chat_completions_are_their_creators(keys: tuple[Key, Key, Key], stream: bool) -> None:
    a, b, _ = keys
    with a.sdk() as sdk:
        if stream:
            chunks = sdk.chat.completions.create(model="gpt-4o-mini", messages=HELLO, store=True, stream=True)
            completion_id = next(iter(chunks)).id
            assert b.call("GET", f"/chat/completions/{completion_id}").status_code == 404
            assert [chunk.id for chunk in chunks] and chunks.response.status_code == 200
        else:
            completion_id = sdk.chat.completions.create(model="gpt-4o-mini", messages=HELLO, store=True).id
        assert sdk.chat.completions.retrieve(completion_id).id == completion_id
        assert [m.content for m in sdk.chat.completions.messages.list(completion_id)] == ["Hello"]
    assert b.call("GET", f"/chat/completions/{completion_id}/messages").status_code == 404
    assert b.call("DELETE", f"/chat/completions/{completion_id}").status_code == 404


def test_replicas_share_owners(
    keys: tuple[Key, Key, Key],
    start_gateway: Callable[..., ThreadedGateway],
    fake: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another gateway on the same database knows what the first one recorded, including a batch's output
    file that both saw (the second finds it recorded already)."""
    a, b, _ = keys
    monkeypatch.setattr(fake, "job_delay_s", 0.05)
    other = start_gateway()
    a2, b2 = Key(a.id, a.secret, other), Key(b.id, b.secret, other)
    with a.sdk() as sdk:
        file = sdk.files.create(file=("in.jsonl", JSONL), purpose="batch").id
        batch = sdk.batches.create(
            input_file_id=file, endpoint="/v1/chat/completions", completion_window="24h"
        )
        output = wait_until(lambda: sdk.batches.retrieve(batch.id).output_file_id, timeout=5)
    assert a2.call("GET", f"/batches/{batch.id}").json()["output_file_id"] == output
    for file_id in (file, output):
        assert a2.call("GET", f"/files/{file_id}").status_code == 200
        assert b2.call("GET", f"/files/{file_id}").status_code == 404


@pytest.fixture
def own_database(
    scratch_db: tuple[str, str], start_gateway: Callable[..., ThreadedGateway]
) -> Iterator[tuple[str, ThreadedGateway]]:
    name, url = scratch_db
    yield name, start_gateway(database_url=url)
    database_up(name)


def test_an_owner_the_database_cannot_tell_is_refused(own_database: tuple[str, ThreadedGateway]) -> None:
    name, gateway = own_database
    a = make_key(gateway)
    with a.sdk() as sdk:
        seen = sdk.files.create(file=("a.jsonl", JSONL), purpose="batch").id
    database_down(name)
    try:
        # Known to this process: still served. Never seen: refused, never guessed.
        assert a.call("GET", f"/files/{seen}").status_code == 200
        refused = a.call("GET", "/files/file-never-seen")
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "ownership_unavailable"
        # An object whose owner cannot be written is not handed out: the client never learns its id.
        with a.sdk() as sdk, pytest.raises(openai.InternalServerError) as caught:
            sdk.files.create(file=("b.jsonl", JSONL), purpose="batch")
        assert caught.value.status_code == 503 and caught.value.code == "ownership_unavailable"
        assert "file-" not in caught.value.response.text
    finally:
        database_up(name)
