"""Request heads and headers as an attacker sends them: a head too large or too slow (against a real
`llm-gateway serve`, whose HTTP server protocol is what bounds them), hop-by-hop headers, a
Content-Encoding the body does not have (or a decompression bomb), and header values in UTF-8."""

from __future__ import annotations

import contextlib
import gzip
import select
import socket
import time
import zlib
from collections.abc import Callable, Iterator

import orjson
import pytest

from tests.db import wait_for_rows
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, GatewayProcess, ThreadedGateway
from tests.security import RawResponse, _read_response, raw_request

HEAD_LIMIT = 16 * 1024
HEAD_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
CHAT = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
AUTH = {"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def served(
    fake_server: FakeOpenAI, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(
        fake_server,
        database_url,
        tmp_path_factory.mktemp("served"),
        env={
            "GATEWAY_MAX_HEADER_BYTES": str(HEAD_LIMIT),
            "GATEWAY_HEADER_TIMEOUT_S": str(HEAD_TIMEOUT_S),
            "GATEWAY_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        },
    ).start()
    yield gateway
    gateway.stop()


def _head(target: str, headers: list[tuple[str, str]], body: bytes = b"") -> bytes:
    lines = [f"POST {target} HTTP/1.1", "Host: gateway", *(f"{name}: {value}" for name, value in headers)]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _send(port: int, data: bytes) -> RawResponse:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        return _read_response(sock)


def _assert_refused_431(response: RawResponse) -> None:
    assert response.status == 431, response.body
    assert response.error_code() == "request_header_fields_too_large"
    assert response.headers["connection"] == "close"


def test_one_header_past_the_limit_is_refused_431_before_the_upstream(
    served: GatewayProcess, fake_server: FakeOpenAI
) -> None:
    fake_server.reset()
    auth = list(AUTH.items())
    response = _send(served.port, _head("/v1/chat/completions", [*auth, ("X-Big", "a" * 100_000)], CHAT))
    _assert_refused_431(response)
    assert fake_server.requests == []


def test_the_head_is_measured_not_the_read_it_came_in(
    served: GatewayProcess, fake_server: FakeOpenAI
) -> None:
    """Many small headers past the limit, arriving at once, are refused as a whole; a small head whose
    body takes the same read far past the limit is served."""
    fake_server.reset()
    headers = [*AUTH.items(), *((f"X-Pad-{i}", "b" * 100) for i in range(300))]
    _assert_refused_431(_send(served.port, _head("/v1/chat/completions", headers, CHAT)))
    assert fake_server.requests == []
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x " * 60_000}]})
    # Half the limit, in headers short enough for the fake upstream's own line limit.
    headers = [*AUTH.items(), *((f"X-Pad-{i}", "c" * 2000) for i in range(HEAD_LIMIT // 4000))]
    response = _send(served.port, _head("/v1/chat/completions", headers, body))
    assert response.status == 200, response.body
    assert len(fake_server.requests) == 1


def test_a_header_of_megabytes_is_refused_without_reading_it_whole(served: GatewayProcess) -> None:
    """Sent a megabyte at a time: the answer is a 431, and the gateway goes on serving, untroubled."""
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Big: ")
        for _ in range(16):
            try:
                sock.sendall(b"a" * 1024 * 1024)
            except OSError:
                break  # the gateway has stopped reading: its answer is waiting
        _assert_refused_431(_read_response(sock))
    assert raw_request(served.port, "GET", "/healthz").status == 200
    assert "Traceback" not in served.log_path.read_text()


def _answer_within(sock: socket.socket, trickle: Callable[[], None] | None, timeout: float) -> bytes:
    """What the gateway sends before it closes the connection, sending `trickle` every 0.2 s meanwhile."""
    received = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], 0.2)
        if readable:
            chunk = sock.recv(65536)
            if not chunk:
                return received
            received += chunk
        elif trickle is not None:
            trickle()
    raise AssertionError(f"the connection is still open after {timeout}s: {received!r}")


def test_a_head_sent_a_byte_at_a_time_is_answered_408_and_closed(
    served: GatewayProcess, fake_server: FakeOpenAI
) -> None:
    fake_server.reset()
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nX-Slow: ")

        def trickle() -> None:
            # Once closed by the gateway, its answer is read next.
            with contextlib.suppress(OSError):
                sock.sendall(b"s")

        answer = _answer_within(sock, trickle, timeout=10 * HEAD_TIMEOUT_S)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b'"code":"request_timeout"' in answer
    assert fake_server.requests == []


def test_a_connection_that_sends_nothing_is_closed(served: GatewayProcess) -> None:
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock:
        assert _answer_within(sock, None, timeout=10 * HEAD_TIMEOUT_S) == b""


def test_the_next_head_on_a_kept_alive_connection_is_bounded_too(served: GatewayProcess) -> None:
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
        assert _read_response(sock).status == 200
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Slow: s")
        answer = _answer_within(sock, None, timeout=10 * HEAD_TIMEOUT_S)
    assert answer.startswith(b"HTTP/1.1 408 "), answer


@pytest.mark.parametrize(
    ("target", "content_type"),
    [
        ("/v1/chat/completions", "application/json"),
        ("/v1/audio/transcriptions", "multipart/form-data; boundary=b"),
        ("/v1/files", "multipart/form-data; boundary=b"),
    ],
)
def test_a_body_that_stops_arriving_is_answered_408_and_closed(
    served: GatewayProcess, fake_server: FakeOpenAI, target: str, content_type: str
) -> None:
    """Metered, held-upload and streamed-upload routes alike: half a body, then silence."""
    fake_server.reset()
    head = (
        f"POST {target} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {MASTER_KEY}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: 100000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock:
        sock.sendall(head.encode() + b"--b\r\nContent-Disposition: form-data; name=")
        answer = _answer_within(sock, None, timeout=10 * BODY_TIMEOUT_S)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b'"code":"request_timeout"' in answer
    assert fake_server.requests == []
    # The gateway goes on serving.
    assert raw_request(served.port, "GET", "/healthz").status == 200


def test_a_body_sent_slowly_but_steadily_is_taken(served: GatewayProcess, fake_server: FakeOpenAI) -> None:
    """Pauses shorter than the timeout, adding up to longer than it, are a slow client, not a stalled one."""
    fake_server.reset()
    body = CHAT
    head = _head("/v1/chat/completions", list(AUTH.items()), body).removesuffix(body)
    pieces = [body[i : i + 8] for i in range(0, len(body), 8)]
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock:
        sock.sendall(head)
        for piece in pieces:
            # Together longer than the timeout: only a gap as long as it counts.
            time.sleep(BODY_TIMEOUT_S * 2 / len(pieces) + 0.05)
            sock.sendall(piece)
        response = _read_response(sock)
    assert response.status == 200, response.body


# -- headers the upstream must not see ------------------------------------------------------------------

HOP_BY_HOP = {
    "Proxy-Authorization": "Basic dXNlcjpzZWNyZXQ=",
    "Proxy-Connection": "keep-alive",
    "Keep-Alive": "timeout=5",
    "TE": "trailers",
    "X-Hop-Secret": "for-the-next-hop-only",
}


@pytest.mark.parametrize(
    ("target", "body"),
    [
        ("/v1/chat/completions", CHAT),
        ("/v1/completions", orjson.dumps({"model": "gpt-3.5-turbo-instruct", "prompt": "hi"})),
    ],
    ids=["metered", "passthrough"],
)
def test_hop_by_hop_headers_stay_at_the_gateway(
    gateway: ThreadedGateway, fake: FakeOpenAI, target: str, body: bytes
) -> None:
    headers = {**AUTH, **HOP_BY_HOP, "X-Kept": "yes", "Connection": "close, X-Hop-Secret"}
    response = raw_request(gateway.port, "POST", target, headers=headers, body=body)
    assert response.status == 200, response.body
    (seen,) = fake.requests
    assert seen.headers["x-kept"] == "yes"
    leaked = {name for name in seen.headers if name in {h.lower() for h in HOP_BY_HOP}}
    assert leaked == set()


PASSTHROUGH_BODY = orjson.dumps({"model": "gpt-3.5-turbo-instruct", "prompt": "hi there"})


@pytest.mark.parametrize(
    ("target", "body"),
    [("/v1/chat/completions", CHAT), ("/v1/completions", PASSTHROUGH_BODY)],
    ids=["metered", "passthrough"],
)
def test_a_plain_body_labelled_gzip_is_refused_400_and_not_forwarded(
    gateway: ThreadedGateway, fake: FakeOpenAI, target: str, body: bytes
) -> None:
    response = raw_request(
        gateway.port, "POST", target, headers={**AUTH, "Content-Encoding": "gzip"}, body=body
    )
    assert response.status == 400, response.body
    assert response.error_code() == "invalid_content_encoding"
    assert fake.requests == []


@pytest.mark.parametrize(
    ("coding", "encode"),
    [("gzip", gzip.compress), ("deflate", zlib.compress)],
)
def test_a_compressed_body_is_decoded_and_sent_plain_once(
    gateway: ThreadedGateway, fake: FakeOpenAI, coding: str, encode: Callable[[bytes], bytes]
) -> None:
    response = raw_request(
        gateway.port,
        "POST",
        "/v1/chat/completions",
        headers={**AUTH, "Content-Encoding": coding},
        body=encode(CHAT),
    )
    assert response.status == 200, response.body
    (seen,) = fake.requests
    assert seen.json == orjson.loads(CHAT)
    assert "content-encoding" not in seen.headers


def test_a_compressed_passthrough_body_is_decoded(gateway: ThreadedGateway, fake: FakeOpenAI) -> None:
    body = orjson.dumps({"model": "gpt-3.5-turbo-instruct", "prompt": "hi there"})
    response = raw_request(
        gateway.port,
        "POST",
        "/v1/completions",
        headers={**AUTH, "Content-Encoding": "gzip"},
        body=gzip.compress(body),
    )
    assert response.status == 200, response.body
    (seen,) = fake.requests
    assert seen.body == body
    assert "content-encoding" not in seen.headers


@pytest.mark.parametrize(
    "target", ["/v1/chat/completions", "/v1/completions"], ids=["metered", "passthrough"]
)
def test_a_decompression_bomb_is_refused_413(
    start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI, target: str
) -> None:
    gateway = start_gateway(max_body_bytes=1024 * 1024, max_upload_bytes=1024 * 1024)
    # 64 MiB of one JSON string, compressed to ~64 KiB.
    bomb = gzip.compress(b'{"model":"gpt-4o-mini","prompt":"' + b"0" * 64 * 1024 * 1024)
    assert len(bomb) < 1024 * 1024
    response = raw_request(
        gateway.port, "POST", target, headers={**AUTH, "Content-Encoding": "gzip"}, body=bomb
    )
    assert response.status == 413, response.body
    assert response.error_code() == "request_too_large"
    assert fake.requests == []


def test_an_encoding_the_gateway_does_not_decode_is_refused_415(
    gateway: ThreadedGateway, fake: FakeOpenAI
) -> None:
    response = raw_request(
        gateway.port,
        "POST",
        "/v1/chat/completions",
        headers={**AUTH, "Content-Encoding": "br"},
        body=CHAT,
    )
    assert response.status == 415, response.body
    assert response.error_code() == "unsupported_content_encoding"
    assert fake.requests == []


# -- header values ------------------------------------------------------------------------------------


def _utf8(text: str) -> str:
    """`text`'s UTF-8 bytes as raw_request sends a header value: one character a byte (Latin-1)."""
    return text.encode().decode("latin-1")


@pytest.mark.parametrize("feature", ["café", "€-budget", "日本語"])
def test_attribution_headers_are_read_as_utf8(
    gateway: ThreadedGateway, fake: FakeOpenAI, database_url: str, feature: str
) -> None:
    request_id = f"utf8-{time.time_ns()}"
    response = raw_request(
        gateway.port,
        "POST",
        "/v1/chat/completions",
        headers={**AUTH, "X-Feature": _utf8(feature), "X-User-Id": _utf8("zoë"), "X-Request-Id": request_id},
        body=CHAT,
    )
    assert response.status == 200, response.body
    (row,) = wait_for_rows(database_url, request_id)
    assert (row["feature"], row["user_id"]) == (feature, "zoë")


@pytest.mark.parametrize("header", ["X-Feature", "X-User-Id"])
def test_an_attribution_header_that_is_not_utf8_is_refused_400(
    gateway: ThreadedGateway, fake: FakeOpenAI, header: str
) -> None:
    response = raw_request(
        gateway.port,
        "POST",
        "/v1/chat/completions",
        headers={**AUTH, header: "caf\xe9"},  # café in Latin-1: not UTF-8
        body=CHAT,
    )
    assert response.status == 400, response.body
    assert response.json()["error"]["param"] == header  # type: ignore[index]
    assert fake.requests == []
