"""Request heads as an attacker sends them: too large or too slow, against a real `llm-gateway serve`,
whose HTTP server protocol is what bounds them."""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Callable, Iterator

import orjson
import pytest

from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, GatewayProcess
from tests.security import RawResponse, _read_response, raw_request

HEAD_LIMIT = 16 * 1024
HEAD_TIMEOUT_S = 1.0
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
        env={"GATEWAY_MAX_HEADER_BYTES": str(HEAD_LIMIT), "GATEWAY_HEADER_TIMEOUT_S": str(HEAD_TIMEOUT_S)},
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
