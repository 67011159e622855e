"""One canonical path: every other spelling of a path is refused before auth and routing, on every route
class, and nothing of it reaches the upstream; the paths the gateway builds for the upstream keep a
client's segment inside its segment."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, GatewayProcess
from tests.security import raw_request

AUTH = {"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"}
CHAT = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
STREAM = orjson.dumps({"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
EMBED = orjson.dumps({"model": "text-embedding-3-small", "input": "hi"})
RESPONSE = orjson.dumps({"model": "gpt-4o", "input": "hi"})
# An upload as the SDKs send it (the form is read before the upload is held against the budgets).
FORM = (
    b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4o-transcribe\r\n'
    b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.mp3"\r\n'
    b"Content-Type: audio/mpeg\r\n\r\nID3\r\n--b--\r\n"
)


def spellings(path: str) -> list[str]:
    """Other spellings of `path` (`/a/b…`) that a URL library resolves back to it, or near it."""
    first, _, rest = path[1:].partition("/")
    head, tail = f"/{first}", f"/{rest}" if rest else ""
    variants = [
        f"{head}/.{tail}",
        f"{head}/%2e{tail}",
        f"{head}/%2E{tail}",
        f"{head}/x/..{tail}",
        f"{head}/x/%2e%2e{tail}",
        f"{head}/x/.%2E{tail}",
        f"{path}/.",
        f"{path}/..",
        f"{head}/{tail}",
        f"{path}/",
        head + tail.replace("/", "\\"),
        f"{head}/x%2f..{tail}",
        f"{head}/x%2F..{tail}",
        f"{head}/x%5c..{tail}",
        f"{path}%00",
        f"{path}%0a",
        f"{path}%7f",
        f"{path}%zz",
        f"{path}%ff",
    ]
    if "/" in rest:
        variants.append(f"{head}/{rest.replace('/', '/./')}")
    # A one-segment path has no separator to turn into a backslash: that variant is the path itself.
    return [variant for variant in variants if variant != path]


# Paths outside the upstream's /v1, spelled as attackers spell them: encoded dots and slashes, mixed case.
ESCAPES = [
    "/v1/%2e%2e/_control",
    "/v1/%2E%2E/%2E%2E/etc/passwd",
    "/v1/..%2f..%2fx",
    "/v1/files/..%2F..%2Fx",
    "/v1/\\..\\..\\x",
    "/v1/files/%2e%2e%5c_control",
    "/v1/files/x%5C..%5C..%5Cy",
    "/v1/..",
    "/v1/files/../../_control",
]

# (method, canonical path, body): the hot routes, FastAPI's routes, the passthrough, admin and probes.
ROUTES = [
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/chat/completions", STREAM),
    ("POST", "/v1/embeddings", EMBED),
    ("POST", "/v1/responses", RESPONSE),
    ("GET", "/v1/responses/resp_123", b""),
    ("GET", "/v1/models", b""),
    ("GET", "/v1/models/gpt-4o", b""),
    ("GET", "/v1/files/file-abc", b""),
    ("POST", "/v1/moderations", orjson.dumps({"input": "hi"})),
    ("POST", "/v1/audio/transcriptions", FORM),
    ("POST", "/v1/images/edits", FORM),
    ("GET", "/v1/usage", b""),
    ("GET", "/v1/usage/summary", b""),
    ("POST", "/v1/browser_tokens", orjson.dumps({"user_id": "u", "origins": ["https://app.example"]})),
    ("POST", "/v1/batches", orjson.dumps({"input_file_id": "file-abc", "endpoint": "/v1/chat/completions"})),
    ("GET", "/v1/batches/batch_abc", b""),
    ("GET", "/dashboard", b""),
    ("GET", "/dashboard/dashboard.js", b""),
    ("GET", "/admin/keys", b""),
    ("GET", "/admin/budgets", b""),
]


@pytest.fixture(scope="module")
def gateway_process(
    fake_server: FakeOpenAI, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    data_dir: Path = tmp_path_factory.mktemp("paths")
    process = GatewayProcess(fake_server, database_url, data_dir).start()
    yield process
    process.stop()


def assert_refused(gateway: GatewayProcess, fake: FakeOpenAI, method: str, target: str, body: bytes) -> None:
    headers = {**AUTH, "Content-Type": "multipart/form-data; boundary=b"} if body is FORM else AUTH
    answer = raw_request(gateway.port, method, target, headers=headers, body=body)
    assert answer.status == 400, (target, answer.status, answer.body)
    error = answer.json()["error"]
    assert isinstance(error, dict)
    assert error["code"] == "invalid_path", (target, answer.body)
    assert error["type"] == "invalid_request_error"
    assert answer.headers.get("x-request-id")
    assert fake.requests == [], (target, [(r.method, r.path) for r in fake.requests])


@pytest.mark.parametrize(
    ("method", "path", "body"),
    ROUTES,
    ids=[f"{m} {p}{' stream' if b is STREAM else ''}" for m, p, b in ROUTES],
)
def test_every_other_spelling_is_refused_on_every_route_class(
    gateway_process: GatewayProcess, fake: FakeOpenAI, method: str, path: str, body: bytes
) -> None:
    for target in spellings(path):
        assert_refused(gateway_process, fake, method, target, body)


@pytest.mark.parametrize("target", ESCAPES)
@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_nothing_outside_v1_reaches_the_upstream(
    gateway_process: GatewayProcess, fake: FakeOpenAI, method: str, target: str
) -> None:
    assert_refused(gateway_process, fake, method, target, b"{}" if method == "POST" else b"")


def test_the_refusal_comes_before_auth(gateway_process: GatewayProcess, fake: FakeOpenAI) -> None:
    answer = raw_request(gateway_process.port, "POST", "/v1/./chat/completions", body=CHAT)
    assert answer.status == 400
    assert answer.error_code() == "invalid_path"


def test_a_model_policy_cannot_be_walked_around(gateway_process: GatewayProcess, fake: FakeOpenAI) -> None:
    created = httpx.post(
        gateway_process.url + "/admin/keys",
        json={"name": "paths-policy", "allowed_models": ["gpt-4o-mini"], "rpm_limit": 1},
        headers=AUTH,
    ).json()
    key = {"Authorization": f"Bearer {created['secret']}", "Content-Type": "application/json"}
    for target in ("/v1/./chat/completions", "/v1/%2e/chat/completions", "/v1/chat/./completions"):
        answer = raw_request(gateway_process.port, "POST", target, headers=key, body=CHAT)
        assert (answer.status, answer.error_code()) == (400, "invalid_path")
    answer = raw_request(gateway_process.port, "POST", "/v1/chat/completions", headers=key, body=CHAT)
    assert (answer.status, answer.error_code()) == (403, "model_not_allowed")
    assert fake.requests == []


def test_canonical_paths_still_work(gateway_process: GatewayProcess, fake: FakeOpenAI) -> None:
    answer = raw_request(gateway_process.port, "POST", "/v1/chat/completions", headers=AUTH, body=CHAT)
    assert answer.status == 200, answer.body
    answer = raw_request(gateway_process.port, "GET", "/healthz")
    assert answer.status == 200


def test_a_segment_stays_a_segment_upstream(gateway_process: GatewayProcess, fake: FakeOpenAI) -> None:
    """Escapes that decode to characters other than separators pass, and go upstream re-encoded inside
    their segment: an encoded '?' or '#' is not a query or a fragment there."""
    raw_request(gateway_process.port, "GET", "/v1/files/file-a%3Fb%23c%20d", headers=AUTH)
    seen = fake.wait_for(lambda r: r.path.startswith("/v1/files/"))
    assert seen.path == "/v1/files/file-a?b#c d"
    assert seen.query == {}
    raw_request(gateway_process.port, "GET", "/v1/models/ft%3Agpt-4o-mini%3Aorg%3A%3Aabc", headers=AUTH)
    seen = fake.wait_for(lambda r: r.path.startswith("/v1/models/"))
    assert seen.path == "/v1/models/ft:gpt-4o-mini:org::abc"
    raw_request(gateway_process.port, "GET", "/v1/responses/resp_1%3Fstream=true", headers=AUTH)
    seen = fake.wait_for(lambda r: r.path.startswith("/v1/responses/"))
    assert seen.path == "/v1/responses/resp_1?stream=true"
    assert seen.query == {}
