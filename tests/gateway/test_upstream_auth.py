"""Per-upstream authentication (GATEWAY_CONFIG `auth`, `api_version`): an upstream that wants Azure
OpenAI's `api-key` header and `api-version` query gets them on every route, from the gateway only; what
the client sends in their place never reaches any upstream. Asserted on the fake upstreams' own logs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from app.config import ConfigError
from app.config_file import load_config_file
from app.proxy.upstream_auth import with_api_version
from tests.conftest import sdk_client
from tests.fakes.openai_upstream import FakeOpenAI, RecordedRequest
from tests.harness import MASTER_KEY, ThreadedGateway
from tests.security import raw_request

AZURE_KEY = "azure-key-0123456789abcdef"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def azure() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key=AZURE_KEY, auth="api-key", api_version="preview") as server:
        yield server


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def azure_gateway(
    start_gateway: Callable[..., ThreadedGateway],
    azure: FakeOpenAI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> ThreadedGateway:
    """A gateway whose default upstream is Azure OpenAI's v1 API."""
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", AZURE_KEY)
    config = f"""
upstreams:
  openai: {{base_url: "{azure.base_url}", api_key_env: AZURE_OPENAI_API_KEY, auth: api-key,
            api_version: preview}}
"""
    return start_gateway(config_file=_config(tmp_path, config))


def _as_azure_wants(request: RecordedRequest) -> None:
    assert request.headers.get("api-key") == AZURE_KEY
    assert "authorization" not in request.headers
    assert request.query_string.split("&").count("api-version=preview") == 1
    assert request.query_string.lower().count("version") == 1


def test_every_route_class_reaches_azure_with_its_key_and_version(
    azure_gateway: ThreadedGateway, azure: FakeOpenAI
) -> None:
    with sdk_client(azure_gateway.base_url) as sdk:
        chat = sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
        stream = sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        embedding = sdk.embeddings.create(model="text-embedding-3-small", input="hi")
        response = sdk.responses.create(model="gpt-4o-mini", input="hi")
        files = sdk.files.list(limit=2)
        models = {model.id for model in sdk.models.list()}
        model = sdk.models.retrieve("gpt-4o-mini")
    assert chat.choices[0].message.content and streamed
    assert embedding.data[0].embedding
    assert response.output_text
    assert files.data == []
    assert "gpt-4o-mini" in models and model.id == "gpt-4o-mini"
    seen = azure.requests
    assert [(r.method, r.path, r.status) for r in seen] == [
        ("POST", "/v1/chat/completions", 200),
        ("POST", "/v1/chat/completions", 200),
        ("POST", "/v1/embeddings", 200),
        ("POST", "/v1/responses", 200),
        ("GET", "/v1/files", 200),
        ("GET", "/v1/models", 200),
        ("GET", "/v1/models/gpt-4o-mini", 200),
    ]
    for request in seen:
        _as_azure_wants(request)
    # The client's own query is kept, the version added after it.
    assert seen[4].query_string == "limit=2&api-version=preview"


def test_a_client_cannot_send_its_own_api_key_or_api_version(
    azure_gateway: ThreadedGateway, azure: FakeOpenAI
) -> None:
    port = azure_gateway.port
    headers = {"authorization": f"Bearer {MASTER_KEY}", "api-key": "client-chosen-key", "Api-Version": "x"}
    spellings = "api-version=2024-02-01&API-VERSION=a&api%2Dversion=b&Api%2dVersion=c&api-version+=d"
    listed = raw_request(port, "GET", f"/v1/files?{spellings}&limit=1&api-version", headers=headers)
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
    chat_headers = {**headers, "content-type": "application/json"}
    chat = raw_request(port, "POST", "/v1/chat/completions?api-version=evil", headers=chat_headers, body=body)
    # A '?' in the path arrives encoded, and stays a part of the path.
    smuggled = raw_request(port, "GET", "/v1/vector_stores%3Fapi-version=evil", headers=headers)
    assert (listed.status, chat.status, smuggled.status) == (200, 200, 404)
    files, completion, stores = azure.requests
    for request in (files, completion, stores):
        _as_azure_wants(request)
    assert files.query_string == "limit=1&api-version=preview"
    assert completion.query_string == "api-version=preview"
    assert stores.path == "/v1/vector_stores?api-version=evil"
    assert stores.query_string == "api-version=preview"


def test_a_client_api_key_header_never_reaches_a_bearer_upstream(
    gateway: ThreadedGateway, fake: FakeOpenAI
) -> None:
    headers = {"authorization": f"Bearer {MASTER_KEY}", "api-key": "client-chosen-key"}
    answer = raw_request(gateway.port, "GET", "/v1/files?limit=1&api-version=preview", headers=headers)
    assert answer.status == 200
    (request,) = fake.requests
    assert "api-key" not in request.headers
    assert request.headers["authorization"] == f"Bearer {fake.api_key}"
    assert request.query_string == "limit=1"


def test_each_upstream_gets_only_its_own_key_across_a_fallback(
    start_gateway: Callable[..., ThreadedGateway],
    fake: FakeOpenAI,
    azure: FakeOpenAI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", AZURE_KEY)
    config = f"""
upstreams:
  azure: {{base_url: "{azure.base_url}", api_key_env: AZURE_OPENAI_API_KEY, auth: api-key,
          api_version: preview}}
models:
  gpt-4.1: {{upstreams: [{{upstream: azure}}]}}
fallbacks:
  gpt-4.1: [gpt-4o-mini]
"""
    gateway = start_gateway(config_file=_config(tmp_path, config), max_attempts=1)
    azure.fail(500)
    with sdk_client(gateway.base_url) as sdk:
        raw = sdk.chat.completions.with_raw_response.create(model="gpt-4.1", messages=MESSAGES)  # type: ignore[arg-type]
    assert raw.headers["x-gateway-model"] == "gpt-4o-mini"
    (first,) = azure.requests
    _as_azure_wants(first)
    assert first.status == 500
    (second,) = fake.requests
    assert second.headers["authorization"] == f"Bearer {fake.api_key}"
    assert "api-key" not in second.headers
    assert second.query_string == ""
    assert AZURE_KEY not in str(second.headers)


def test_a_key_azure_refuses_is_named_as_the_config_files(
    start_gateway: Callable[..., ThreadedGateway],
    azure: FakeOpenAI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "not-the-key")
    config = f"""
upstreams:
  openai: {{base_url: "{azure.base_url}", api_key_env: AZURE_OPENAI_API_KEY, auth: api-key}}
"""
    gateway = start_gateway(config_file=_config(tmp_path, config))
    with sdk_client(gateway.base_url) as sdk, pytest.raises(openai.InternalServerError) as caught:
        sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    # The gateway's own key was refused: the operator is told which setting holds it.
    assert caught.value.code == "upstream_auth_failed"
    assert "the api_key_env of upstream 'openai' in GATEWAY_CONFIG" in caught.value.message
    (request,) = azure.requests
    assert request.headers["api-key"] == "not-the-key"


@pytest.mark.parametrize(
    ("upstream", "reason"),
    [
        ('{base_url: "http://a/v1", auth: basic}', "upstreams.a.auth: Input should be 'bearer' or 'api-key'"),
        ('{base_url: "http://a/v1", api_version: "x&api-key=y"}', "upstreams.a.api_version: String should"),
        ('{base_url: "http://a/v1", api_version: ""}', "upstreams.a.api_version: String should"),
        ('{base_url: "http://a/v1?api-version=x"}', "upstreams.a.base_url: must not hold a query"),
    ],
)
def test_bad_auth_settings_are_refused_with_one_line(upstream: str, reason: str, tmp_path: Path) -> None:
    path = _config(tmp_path, f"upstreams: {{a: {upstream}}}\n")
    with pytest.raises(ConfigError) as caught:
        load_config_file(path)
    assert reason in str(caught.value)


@pytest.mark.parametrize(
    ("url", "version", "expected"),
    [
        ("http://u/v1/models", None, "http://u/v1/models"),
        ("http://u/v1/models", "preview", "http://u/v1/models?api-version=preview"),
        (
            "http://u/v1/files?limit=2&after=f",
            "preview",
            "http://u/v1/files?limit=2&after=f&api-version=preview",
        ),
        ("http://u/v1/files?API%2dVERSION=x&limit=2", None, "http://u/v1/files?limit=2"),
        (
            "http://u/v1/files?api+version=x&api-versions=y&q=api-version",
            None,
            "http://u/v1/files?api+version=x&api-versions=y&q=api-version",
        ),
        ("http://u/v1/files?&&api-version=", "latest", "http://u/v1/files?api-version=latest"),
    ],
)
def test_with_api_version(url: str, version: str | None, expected: str) -> None:
    assert with_api_version(url, version) == expected
