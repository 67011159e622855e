"""Key scopes: a gateway key calls only the endpoint classes it was granted, on the metered routes and
through passthrough alike; the master key calls all of them."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from typing import Any

import openai
import orjson
import pytest

from tests.conftest import sdk_client
from tests.db import fetch
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, ThreadedGateway
from tests.security import RawResponse, raw_request

MASTER = {"authorization": f"Bearer {MASTER_KEY}"}
MESSAGES: Any = [{"role": "user", "content": "hi"}]
# A new key's classes, as the README documents them.
DEFAULT_SCOPES = [
    "audio",
    "chat",
    "completions",
    "embeddings",
    "images",
    "models",
    "moderations",
    "responses",
]


def admin(
    gateway: ThreadedGateway, method: str, path: str, body: dict[str, Any] | None = None
) -> RawResponse:
    return raw_request(
        gateway.port,
        method,
        "/admin/keys" + path,
        headers={**MASTER, "content-type": "application/json"},
        body=orjson.dumps(body) if body is not None else b"",
    )


def make_key(gateway: ThreadedGateway, **spec: Any) -> dict[str, Any]:
    created = admin(gateway, "POST", "", {"name": f"svc-{uuid.uuid4().hex[:6]}", **spec})
    assert created.status == 201, created.body
    return created.json()


def call(gateway: ThreadedGateway, key: dict[str, Any], method: str, path: str) -> RawResponse:
    body = b'{"model": "gpt-4o", "input": "hi"}' if method == "POST" else b""
    return raw_request(
        gateway.port,
        method,
        path,
        headers={"authorization": f"Bearer {key['secret']}", "content-type": "application/json"},
        body=body,
    )


def refused_for(answer: RawResponse, name: str) -> bool:
    error = answer.json()["error"]
    assert isinstance(error, dict)
    return answer.status == 403 and error["code"] == "scope_not_allowed" and f"'{name}'" in error["message"]


def test_a_new_key_gets_the_inference_classes_and_is_refused_files_until_granted(
    gateway: ThreadedGateway, fake: FakeOpenAI
) -> None:
    key = make_key(gateway)
    assert key["scopes"] == DEFAULT_SCOPES
    for path in ("/v1/files", "/v1/files/file-1/content", "/v1/uploads", "/v1/vector_stores"):
        assert refused_for(call(gateway, key, "GET", path), path.split("/")[2]), path
    assert refused_for(call(gateway, key, "POST", "/v1/batches"), "batches")
    assert fake.requests == []
    granted = admin(gateway, "PATCH", f"/{key['id']}", {"scopes": [*DEFAULT_SCOPES, "files"]})
    assert granted.status == 200 and "files" in granted.json()["scopes"]  # type: ignore[operator]
    # The key cache forgets a changed key at once.
    assert call(gateway, key, "GET", "/v1/files").status == 200
    assert [request.path for request in fake.requests] == ["/v1/files"]
    assert refused_for(call(gateway, key, "GET", "/v1/uploads/upload-1"), "uploads")


def test_hot_routes_need_their_class_too(gateway: ThreadedGateway, fake: FakeOpenAI) -> None:
    key = make_key(gateway, scopes=["embeddings"])
    with sdk_client(gateway.base_url, api_key=key["secret"]) as sdk:
        with pytest.raises(openai.PermissionDeniedError) as caught:
            sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert caught.value.code == "scope_not_allowed" and "'chat'" in caught.value.message
        with pytest.raises(openai.PermissionDeniedError) as caught:
            sdk.responses.create(model="gpt-4o", input="hi")
        assert "'responses'" in caught.value.message
        with pytest.raises(openai.PermissionDeniedError) as caught:
            sdk.models.list()
        assert "'models'" in caught.value.message
        sdk.embeddings.create(model="text-embedding-3-small", input="hi")
    assert [request.path for request in fake.requests] == ["/v1/embeddings"]


def test_master_key_and_all_scopes_reach_every_class(gateway: ThreadedGateway, fake: FakeOpenAI) -> None:
    everything = make_key(gateway, scopes=["*"])
    assert everything["scopes"] == ["*"]
    paths = [
        "/v1/files",
        "/v1/batches",
        "/v1/vector_stores",
        "/v1/containers",
        "/v1/threads/t-1",
        "/v1/nonesuch",
    ]
    for key in ({"secret": MASTER_KEY}, everything):
        for path in paths:
            answer = call(gateway, key, "GET", path)
            assert answer.status != 403, (path, answer.body)
    assert [request.path for request in fake.requests] == paths * 2


def test_an_unknown_class_is_a_400_naming_it_and_changes_nothing(gateway: ThreadedGateway) -> None:
    created = admin(gateway, "POST", "", {"name": "typo", "scopes": ["chat", "file", "imagez"]})
    assert created.status == 400
    assert "file, imagez" in created.body.decode() and created.error_code() is None
    assert created.json()["error"]["param"] == "scopes"  # type: ignore[index]
    key = make_key(gateway, scopes=["chat"])
    for change in ({"scopes": ["chat", "filez"]}, {"scopes": None}):
        refused = admin(gateway, "PATCH", f"/{key['id']}", change)
        assert refused.status == 400, change
    assert admin(gateway, "GET", f"/{key['id']}").json()["scopes"] == ["chat"]


def test_keys_from_before_scopes_keep_every_class(
    gateway: ThreadedGateway, fake: FakeOpenAI, database_url: str
) -> None:
    key = make_key(gateway)
    # What migration 0004 leaves in the rows of the keys that existed before it (the key is not cached
    # yet: its first call reads the row).
    fetch(database_url, "UPDATE api_keys SET scopes = NULL WHERE id = $1 RETURNING id", key["id"])
    assert admin(gateway, "GET", f"/{key['id']}").json()["scopes"] == ["*"]
    assert call(gateway, key, "GET", "/v1/files").status == 200
    assert [request.path for request in fake.requests] == ["/v1/files"]


def test_cli_creates_a_key_with_scopes_and_names_unknown_ones(
    gateway: ThreadedGateway, database_url: str
) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
        "DATABASE_URL": database_url,
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "app.cli", "keys", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)

    created = cli("create", "cli-scoped", "--scopes", "chat,files")
    assert created.returncode == 0, created.stderr
    assert "scopes: chat,files" in created.stdout
    key_id = created.stdout.split()[1]
    assert admin(gateway, "GET", f"/{key_id}").json()["scopes"] == ["chat", "files"]
    refused = cli("create", "cli-typo", "--scopes", "chat,filez")
    assert refused.returncode == 2 and "filez" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_scope_is_checked_before_the_limits_count_the_call(
    gateway: ThreadedGateway, fake: FakeOpenAI
) -> None:
    key = make_key(gateway, rpm_limit=1)
    for _ in range(3):
        assert refused_for(call(gateway, key, "GET", "/v1/files"), "files")
    assert call(gateway, key, "GET", "/v1/models").status == 200
    assert call(gateway, key, "GET", "/v1/models").status == 429
