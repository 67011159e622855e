"""A kept-alive connection between two requests holds nothing of the request that ended on it: uvicorn
keeps a connection's last request (its scope, and all a request leaves there) until the next one comes,
and with 1,000 streams open those idle connections' leftovers were a third of what each collection of
the garbage collector walked."""

from __future__ import annotations

import socket
import time
import weakref
from collections.abc import Callable
from typing import Any

from app.config import Settings
from tests.harness import ThreadedGateway, wait_until
from tests.security import _read_response

REQUEST = b"GET /any HTTP/1.1\r\nHost: gateway\r\n\r\n"
# The head of a request with a 10-byte body, which the tests send in parts.
HEAD_OF_TEN = b"POST /any HTTP/1.1\r\nHost: gateway\r\nContent-Length: 10\r\n\r\n"


class _Leftover:
    """What a request leaves in its scope (the gateway's call record, its parsed body)."""


def test_a_request_that_ended_on_a_kept_alive_connection_is_released_before_the_next(
    make_settings: Callable[..., Settings],
) -> None:
    left: list[weakref.ref[_Leftover]] = []

    server = ThreadedGateway(make_settings(), app=_answering_ok(left)).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            for n in (1, 2):
                sock.sendall(REQUEST)
                response = _read_response(sock)
                assert response.status == 200 and response.body == b"ok"
                assert len(left) == n
                # The connection is still open, waiting for a next request (uvicorn's keep-alive timeout is
                # 5 s): the one that ended is gone.
                wait_until(lambda: left[-1]() is None, timeout=2)
            # Pipelined: the second request is read before the first is answered; then a third whose
            # head comes in two writes. Each is answered, on the same connection.
            sock.sendall(REQUEST * 2 + REQUEST[:10])
            _answers(sock, 2)
            sock.sendall(REQUEST[10:])
            _answers(sock, 1)
            assert len(left) == 5
            wait_until(lambda: all(ref() is None for ref in left), timeout=2)
    finally:
        server.stop()


def test_a_request_answered_before_its_body_came_keeps_its_connection_usable(
    make_settings: Callable[..., Settings],
) -> None:
    """A refusal answers before the body is read; the rest of the body arrives after the answer, and the
    parser hands it to the request it belongs to. Released before that, the request's cycle was gone and
    the body's bytes were a parse error (a 400 "Invalid HTTP request" and a closed connection)."""
    left: list[weakref.ref[_Leftover]] = []

    server = ThreadedGateway(make_settings(), app=_answering_ok(left)).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(HEAD_OF_TEN + b"01234")
            _answers(sock, 1)
            sock.sendall(b"56789")
            # Let go once the body has all come, before any next request.
            wait_until(lambda: left[-1]() is None, timeout=2)
            sock.sendall(HEAD_OF_TEN + b"0123456789")
            _answers(sock, 1)
            sock.sendall(REQUEST)
            _answers(sock, 1)
            assert len(left) == 3
    finally:
        server.stop()


def test_a_body_owed_after_its_answer_is_bounded_in_time(make_settings: Callable[..., Settings]) -> None:
    """A client that is answered (refused) before its body came and then sends no more of it has its
    connection closed once the body timeout passes, as any body that stops arriving does: not held for
    as long as the client likes."""
    left: list[weakref.ref[_Leftover]] = []
    timeout_s = 0.5
    server = ThreadedGateway(make_settings(body_timeout_s=timeout_s), app=_answering_ok(left)).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10 * timeout_s) as sock:
            sock.sendall(HEAD_OF_TEN + b"01234")
            _answers(sock, 1)
            started = time.monotonic()
            assert sock.recv(65536) == b"", "the connection was closed without another byte"
            assert timeout_s * 0.8 <= time.monotonic() - started < 10 * timeout_s
            wait_until(lambda: left[-1]() is None, timeout=2)
    finally:
        server.stop()


def _answering_ok(left: list[weakref.ref[_Leftover]]) -> Any:
    """An application answering every request `ok` without reading its body (as the gateway refuses a key
    before it reads one), leaving a _Leftover in its scope; `left` gets a weak reference to each."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        leftover = _Leftover()
        left.append(weakref.ref(leftover))
        scope["leftover"] = leftover
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def _answers(sock: socket.socket, count: int) -> None:
    """Read `count` answers, which may come in one read."""
    data = b""
    while data.count(b"\r\n\r\nok") < count:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    assert data.count(b"HTTP/1.1 200 OK\r\n") == count
