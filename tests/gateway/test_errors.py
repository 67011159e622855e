"""Bad input and auth failures: OpenAI-format 4xx errors the SDK maps, nothing sent upstream."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import openai
import pytest

from tests.conftest import sdk_client
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, ThreadedGateway

AUTH = {"authorization": f"Bearer {MASTER_KEY}"}
CHAT = "/v1/chat/completions"


def _error(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert response.headers["x-request-id"]
    error: dict[str, object] = body["error"]
    return error


@pytest.mark.parametrize(
    ("content", "param"),
    [
        (b'{"model": "gpt-4o", "messages": [', None),
        (b"[1, 2]", None),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": 42, "messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": "gpt-4o"}', "messages"),
        (b'{"model": "gpt-4o", "messages": "hello"}', "messages"),
        (b'{"model": "gpt-4o", "messages": []}', "messages"),
        (b'{"model": "gpt-4o", "messages": ["hello"]}', "messages[0]"),
        (
            b'{"model": "gpt-4o", "messages": [{"role": "user"}], "stream": true, "stream_options": 3}',
            "stream_options",
        ),
    ],
)
def test_bad_body_is_400_naming_the_param(
    content: bytes, param: str | None, gateway: ThreadedGateway, fake: FakeOpenAI
) -> None:
    response = httpx.post(
        gateway.url + CHAT, content=content, headers={**AUTH, "content-type": "application/json"}
    )
    assert response.status_code == 400
    error = _error(response)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert fake.requests == []


def test_sdk_raises_bad_request_for_missing_messages(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=None)  # type: ignore[arg-type]
    assert caught.value.param == "messages"
    assert fake.requests == []


def test_body_over_the_limit_is_413(start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI) -> None:
    gateway = start_gateway(max_body_bytes=4096)
    big = [{"role": "user", "content": "x" * 5000}]
    with sdk_client(gateway.base_url) as sdk, pytest.raises(openai.APIStatusError) as caught:
        sdk.chat.completions.create(model="gpt-4o", messages=big)  # type: ignore[arg-type]
    assert caught.value.status_code == 413
    assert caught.value.code == "request_too_large"
    # Without a Content-Length (chunked upload) the limit holds too.
    chunks = iter([b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "', b"y" * 5000, b'"}]}'])
    response = httpx.post(gateway.url + CHAT, content=chunks, headers=AUTH)
    assert response.status_code == 413
    assert _error(response)["code"] == "request_too_large"
    assert fake.requests == []


def test_unknown_route_is_404(gateway: ThreadedGateway, fake: FakeOpenAI) -> None:
    response = httpx.post(gateway.url + "/no/such/thing", json={}, headers=AUTH)
    assert response.status_code == 404
    assert "/no/such/thing" in str(_error(response)["message"])
    # Under /v1 every path is the upstream's to answer (passthrough): its 404 comes back as it was.
    response = httpx.post(gateway.url + "/v1/no/such/thing", json={}, headers=AUTH)
    assert response.status_code == 404
    assert _error(response)["message"]
    assert fake.requests[-1].path == "/v1/no/such/thing"


def test_wrong_method_is_405_in_openai_format(gateway: ThreadedGateway) -> None:
    response = httpx.post(gateway.url + "/healthz", headers=AUTH)
    assert response.status_code == 405
    _error(response)


@pytest.mark.parametrize(
    "headers", [{}, {"authorization": "Bearer sk-wrong"}, {"authorization": "Basic abc"}]
)
def test_missing_or_wrong_key_is_401(
    headers: dict[str, str], gateway: ThreadedGateway, fake: FakeOpenAI
) -> None:
    response = httpx.post(gateway.url + CHAT, json={"model": "gpt-4o", "messages": []}, headers=headers)
    assert response.status_code == 401
    assert _error(response)["code"] == "invalid_api_key"
    assert fake.requests == []


def test_sdk_raises_authentication_error(gateway: ThreadedGateway, fake: FakeOpenAI) -> None:
    with (
        sdk_client(gateway.base_url, api_key="sk-not-the-key") as sdk,
        pytest.raises(openai.AuthenticationError),
    ):
        sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert fake.requests == []


@pytest.mark.parametrize(
    ("name", "value"),
    [("X-Feature", ""), ("X-Feature", "f" * 129), ("X-Feature", "tab\there"), ("X-User-Id", "u" * 200)],
)
def test_invalid_attribution_headers_are_400(
    name: str, value: str, client: openai.OpenAI, fake: FakeOpenAI
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}], extra_headers={name: value}
        )
    assert caught.value.param == name
    assert fake.requests == []


def test_invalid_body_user_is_400(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}], user="u" * 129
        )
    assert caught.value.param == "user"
    assert fake.requests == []


def test_invalid_request_id_is_400_with_a_fresh_id(gateway: ThreadedGateway, fake: FakeOpenAI) -> None:
    response = httpx.post(
        gateway.url + CHAT,
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]},
        headers={**AUTH, "x-request-id": "has spaces; and <angle> brackets"},
    )
    assert response.status_code == 400
    assert _error(response)["param"] == "X-Request-Id"
    assert response.headers["x-request-id"].startswith("req_")
    assert fake.requests == []
