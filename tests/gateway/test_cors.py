"""CORS on /v1/*: preflights answered for the allowed origins with the headers the JS SDK sends, the
gateway's headers exposed on every answer (errors and streams too), nothing for other origins, nothing at
all by default. Raw HTTP, as a browser's requests look on the wire."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import httpx
import orjson

from tests.fakes.openai_upstream import FakeOpenAI
from tests.gateway.test_keys import create_key
from tests.harness import MASTER_KEY, ThreadedGateway
from tests.security import RawResponse, raw_request

PAGE = "http://127.0.0.1:5173"
# What the official `openai` npm package asks for in a browser (v6): its telemetry, retry and timeout
# headers, plus the gateway's attribution headers a page may add.
SDK_HEADERS = (
    "authorization,content-type,x-stainless-arch,x-stainless-lang,x-stainless-os,"
    "x-stainless-package-version,x-stainless-retry-count,x-stainless-runtime,"
    "x-stainless-runtime-version,x-stainless-timeout,openai-organization,x-feature,x-user-id,x-request-id"
)
CHAT = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})


def preflight(gateway: ThreadedGateway, origin: str, headers: str = SDK_HEADERS) -> RawResponse:
    return raw_request(
        gateway.port,
        "OPTIONS",
        "/v1/chat/completions",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": headers,
        },
    )


def chat(
    gateway: ThreadedGateway, origin: str | None, key: str = MASTER_KEY, stream: bool = False
) -> RawResponse:
    body = orjson.dumps({**orjson.loads(CHAT), "stream": stream})
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    if origin is not None:
        headers["Origin"] = origin
    return raw_request(gateway.port, "POST", "/v1/chat/completions", headers=headers, body=body)


def test_preflight_for_an_allowed_origin(
    start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI
) -> None:
    gateway = start_gateway(cors_origins=(PAGE, "https://app.example.com"))
    answer = preflight(gateway, PAGE)
    assert answer.status == 204
    assert answer.headers["access-control-allow-origin"] == PAGE
    allowed = set(answer.headers["access-control-allow-headers"].split(", "))
    assert allowed == set(SDK_HEADERS.split(","))
    assert "POST" in answer.headers["access-control-allow-methods"]
    assert "Origin" in answer.headers["vary"]
    # Never with credentials: the gateway has no cookies, and a wildcard must never pair with them.
    assert "access-control-allow-credentials" not in answer.headers
    # Answered before the request context: not a call (no request id, no access-log line, no metering).
    assert "x-request-id" not in answer.headers
    assert fake.requests == []


def test_preflights_are_not_rate_limited(start_gateway: Callable[..., ThreadedGateway]) -> None:
    gateway = start_gateway(cors_origins=(PAGE,))
    key = create_key(gateway, rpm_limit=1)["secret"]
    for _ in range(3):
        assert preflight(gateway, PAGE, "authorization,content-type").status == 204
    assert chat(gateway, PAGE, key).status == 200
    limited = chat(gateway, PAGE, key)
    assert limited.status == 429
    # The refusal is readable by the page: its CORS headers, and the retry hint exposed.
    assert limited.headers["access-control-allow-origin"] == PAGE
    assert "retry-after" in limited.headers["access-control-expose-headers"]


def test_other_origins_get_no_cors_headers(start_gateway: Callable[..., ThreadedGateway]) -> None:
    gateway = start_gateway(cors_origins=(PAGE,))
    for origin in ("http://127.0.0.1:5174", "https://127.0.0.1:5173", "http://evil.example", "null"):
        answer = preflight(gateway, origin)
        assert answer.status == 403
        assert not any(name.startswith("access-control-") for name in answer.headers), origin
        called = chat(gateway, origin)
        assert called.status == 200
        assert not any(name.startswith("access-control-") for name in called.headers), origin


def test_preflight_refuses_headers_the_gateway_does_not_take(
    start_gateway: Callable[..., ThreadedGateway],
) -> None:
    gateway = start_gateway(cors_origins=(PAGE,))
    answer = preflight(gateway, PAGE, "authorization,x-forwarded-for")
    assert answer.status == 403
    assert "access-control-allow-origin" not in answer.headers
    # A path the gateway refuses is not preflighted either.
    bad = raw_request(
        gateway.port,
        "OPTIONS",
        "/v1/./chat/completions",
        headers={"Origin": PAGE, "Access-Control-Request-Method": "POST"},
    )
    assert bad.status == 403


def test_answers_expose_the_gateway_headers_on_json_errors_and_streams(
    start_gateway: Callable[..., ThreadedGateway],
) -> None:
    gateway = start_gateway(cors_origins=(PAGE,))
    answer = chat(gateway, PAGE)
    assert answer.status == 200
    assert answer.headers["access-control-allow-origin"] == PAGE
    exposed = set(answer.headers["access-control-expose-headers"].split(", "))
    assert {"x-request-id", "x-gateway-attempts", "x-gateway-model"} <= exposed
    assert "Origin" in answer.headers["vary"]
    refused = chat(gateway, PAGE, key="sk-gw-not-a-key")
    assert refused.status == 401
    assert refused.headers["access-control-allow-origin"] == PAGE
    assert "x-request-id" in refused.headers["access-control-expose-headers"]
    streamed = chat(gateway, PAGE, stream=True)
    assert streamed.status == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.headers["access-control-allow-origin"] == PAGE
    assert b"data: [DONE]" in streamed.body
    not_found = raw_request(gateway.port, "GET", "/v1/nothing-here", headers={"Origin": PAGE})
    assert not_found.headers["access-control-allow-origin"] == PAGE


def test_wildcard_allows_any_origin_without_credentials(
    start_gateway: Callable[..., ThreadedGateway],
) -> None:
    gateway = start_gateway(cors_origins=("*",))
    origin = f"http://{uuid.uuid4().hex[:8]}.example"
    answer = preflight(gateway, origin)
    assert answer.status == 204
    assert answer.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in answer.headers
    assert chat(gateway, origin).headers["access-control-allow-origin"] == "*"


def test_off_by_default(gateway: ThreadedGateway) -> None:
    answer = preflight(gateway, PAGE)
    assert answer.status != 204
    assert not any(name.startswith("access-control-") for name in answer.headers)
    assert not any(name.startswith("access-control-") for name in chat(gateway, PAGE).headers)
    # Outside /v1 nothing changes either way.
    assert (
        "access-control-allow-origin"
        not in httpx.get(gateway.url + "/healthz", headers={"Origin": PAGE}).headers
    )
