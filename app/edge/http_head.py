"""The HTTP/1.1 server protocol: uvicorn's httptools protocol with bounds on the request head.

httptools (llhttp) puts no limit on a head: a 48 MB header was parsed whole (the event loop stalled for
0.6-1.6 s; eight 32 MB headers left the process ~90-280 MB larger), and a connection sending its head a
byte a second was held for ever. Here a head larger than GATEWAY_MAX_HEADER_BYTES is answered 431, and a
head not received within GATEWAY_HEADER_TIMEOUT_S 408 (of a new connection's opening, or of its first
byte on a kept-alive one: the wait before that is uvicorn's keep-alive timeout).

What is counted: the bytes read while a head is incomplete, so a large header is refused after at most
one read past the bound, before it is ever whole; a head that ends within a read is measured from its
parsed target and header fields, and only when that read could have taken it past the bound. A head that
arrives in one read, nearly every request's, costs a comparison and starts no timer.

A request body is bounded in time too: one that has not finished and sends nothing for
GATEWAY_BODY_TIMEOUT_S (between two reads, as nginx's client_body_timeout) is answered 408 and the
connection closed; the application waiting for the rest is told the client has gone. A body that
arrives with its head starts no timer.

Its responses go out with their head and their first body bytes in one send (_HeadWithBody), the head's
names and values checked in two passes over all of them (_write_head). Between two requests a kept-alive
connection holds nothing of the one that ended (uvicorn keeps it until the next one comes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from functools import partial
from typing import Any, cast

from uvicorn._types import (
    ASGI3Application,
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    HTTPResponseStartEvent,
    Scope,
)
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.server import ServerState

from app.config import Settings
from app.errors import error_body

# How long a refused client may go on sending before the connection closes: reading what it sends
# meanwhile lets it read the answer instead of a reset (RFC 9112 §9.6).
_LINGER_S = 2.0


def head_limited_protocol(settings: Settings) -> type[asyncio.Protocol]:
    """uvicorn's `http=`. A partial rather than a class made here: uvicorn pickles its config for
    `--workers` processes, and only a module-level class pickles."""
    protocol = partial(
        HeadLimitedProtocol,
        max_head_bytes=settings.max_header_bytes,
        head_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
    )
    return cast("type[asyncio.Protocol]", protocol)


class HeadLimitedProtocol(HttpToolsProtocol):
    _responses: _HeadWithBody

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        max_head_bytes: int,
        head_timeout_s: float,
        body_timeout_s: float,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.max_head_bytes = max_head_bytes
        self.head_timeout_s = head_timeout_s
        self.body_timeout_s = body_timeout_s
        # While a request's body is incomplete: the timer, and when its last bytes came.
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_read_at = 0.0
        # Bytes of the head being read, in the reads before this one; -1 between heads.
        self._head_bytes = -1
        self._read = 0
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._responses = _HeadWithBody(transport, self.loop)
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._read = len(data)
        super().data_received(data)
        cycle = self.cycle
        if cycle is not None and cycle.more_body:
            # A body still arriving (even one answered already): this read is its latest sign of life.
            self._watch_body()
        if self._head_bytes < 0 or self.transport.is_closing():
            return
        # The head is still incomplete: all of this read was head (or, after a pipelined request, its end
        # and the next head's start).
        self._head_bytes += self._read
        if self._head_bytes > self.max_head_bytes:
            self._refuse(431, self._too_large_message(), "request_header_fields_too_large")
        elif self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        too_large = (
            self._head_bytes + self._read > self.max_head_bytes
            and self._parsed_head_bytes() > self.max_head_bytes
        )
        self._head_bytes = -1
        if not too_large:
            super().on_headers_complete()
        else:
            # Answered as uvicorn answers past its concurrency limit: by another app for this one request.
            app, self.app = self.app, partial(_refusal, self._too_large_message())
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        if self.cycle is not None:
            self.cycle.transport = self._responses  # type: ignore[assignment]

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        super()._start_asgi_task(cycle, partial(_heads_written_here, app, cycle))

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # uvicorn keeps a kept-alive connection's last request until the next one comes (its cycle, its
        # scope and headers), and with it all the request left in the scope: its call record, its parsed
        # body, ~30 objects. With 1,000 streams ending and starting on ~1,200 connections, the idle ones'
        # were a third of the objects each collection of the garbage collector walked, a stall of every
        # open stream. Kept while the next request is already there: parsed (pipelined) or being parsed,
        # and while this one's body is still arriving (it was answered before all of it came: a refusal),
        # since the parser hands the rest of it to this cycle.
        cycle = self.cycle
        if cycle is None or not cycle.response_complete:
            return
        if cycle.more_body:
            # Its body is still owed: bounded in time as any body is, though nobody will read it.
            self._watch_body()
        else:
            self._release()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        cycle = self.cycle
        if cycle is not None and cycle.response_complete:
            # Answered before its body had all come: let go now that it has.
            self._release()

    def _release(self) -> None:
        """Let go of the connection's ended request, unless the next one is already there."""
        if not self.pipeline and self._head_bytes < 0:
            self.cycle = self.scope = None  # type: ignore[assignment]
            self.headers = []

    def _parsed_head_bytes(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _too_large_message(self) -> str:
        return f"Request header fields are larger than the gateway's limit of {self.max_head_bytes} bytes."

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _watch_body(self) -> None:
        """A body's bytes came (or are still owed): its idle timer runs from now."""
        self._body_read_at = self.loop.time()
        if self._body_timer is None:
            self._body_timer = self.loop.call_later(self.body_timeout_s, self._body_timed_out)

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_timed_out(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if cycle is None or not cycle.more_body or self.transport.is_closing():
            return
        if self.flow.read_paused:
            # Not the client's wait: the application has not taken what came (uvicorn stopped reading).
            self._body_read_at = self.loop.time()
        idle = self.loop.time() - self._body_read_at
        if idle < self.body_timeout_s:
            self._body_timer = self.loop.call_later(self.body_timeout_s - idle, self._body_timed_out)
            return
        if cycle.response_complete:
            # Answered before its body came (a refusal): nobody waits for the rest, only the connection.
            self.transport.close()
            return
        # The application waiting for the rest of the body is told the client has gone.
        started = cycle.response_started
        cycle.disconnected = True
        cycle.message_event.set()
        if started:
            self.transport.close()
        else:
            self._refuse(
                408,
                f"The request body stopped arriving for {self.body_timeout_s:g} s "
                "(the gateway's GATEWAY_BODY_TIMEOUT_S).",
                "request_timeout",
            )

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_bytes > 0:
            self._refuse(
                408,
                f"The request head did not arrive within the gateway's {self.head_timeout_s:g} s.",
                "request_timeout",
            )
        else:  # nothing was sent: there is no request to answer
            self.transport.close()

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answer an incomplete head and stop parsing this connection: what the client still sends is
        read and dropped until it stops or _LINGER_S has passed."""
        self._cancel_head_timer()
        self._unset_keepalive_if_required()
        self.connections.discard(self)
        body = error_body(message, status=status, code=code)
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head.extend([name, b": ", value, b"\r\n"])
        head.append(
            b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        )
        self.transport.write(b"".join(head) + body)
        self.transport.set_protocol(_Lingering(self.transport, self.loop))
        self.parser = None  # type: ignore[assignment]


# The bytes uvicorn allows in a response header's name and in its value, read off its own checks.
_NAME_BYTES = bytes(b for b in range(256) if not HEADER_RE.search(bytes((b,))))
_VALUE_BYTES = bytes(b for b in range(256) if not HEADER_VALUE_RE.search(bytes((b,))))


def _heads_written_here(
    app: ASGI3Application,
    cycle: RequestResponseCycle,
    scope: Scope,
    receive: ASGIReceiveCallable,
    send: ASGISendCallable,
) -> Awaitable[None]:
    """The application, with the start of its response written by `_write_head` rather than uvicorn's
    `send`; anything else, or a start uvicorn would log or wait to send, goes to uvicorn's `send`. The
    application's coroutine itself, not one awaiting it: a frame less at each of the request's waits."""

    # Not a coroutine itself: uvicorn's send's awaitable is handed back as it is, a frame less for each
    # of a stream's events.
    def send_or_write_head(message: ASGISendEvent) -> Awaitable[None]:
        if message["type"] == "http.response.start" and not (
            cycle.response_started or cycle.access_log or cycle.flow.write_paused or cycle.disconnected
        ):
            _write_head(cycle, message)
            return _written()
        return send(message)

    return app(scope, receive, send_or_write_head)


async def _written() -> None:
    """What awaiting a head that `_write_head` wrote waits for: nothing."""


def _write_head(cycle: RequestResponseCycle, message: HTTPResponseStartEvent) -> None:
    """A response's head as uvicorn writes it, with its names and values checked in two passes over all
    of them, where uvicorn searches each name and each value with a regular expression: a relayed
    stream's headers took 19 searches, 29,000 instructions, 3.8% of the stream's (callgrind). What is
    refused, and how, and the cycle's state after it, are uvicorn's."""
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    status = message["status"]
    names: list[bytes] = []
    lines: list[bytes] = []
    says_close = False
    for name, value in (*cycle.default_headers, *message.get("headers", ())):
        name = name.lower()
        if name == b"content-length" and cycle.chunked_encoding is None:
            cycle.expected_content_length = int(value.decode())
            cycle.chunked_encoding = False
        elif name == b"transfer-encoding" and value.lower() == b"chunked":
            cycle.expected_content_length = 0
            cycle.chunked_encoding = True
        elif name == b"connection" and b"close" in (token.lower().strip() for token in value.split(b",")):
            cycle.keep_alive, says_close = False, True
        names.append(name)
        lines += (name, b": ", value, b"\r\n")
    joined = b"".join(names)
    # The usual names, lower-case letters, digits and dashes, without the table `translate` builds.
    if not joined.replace(b"-", b"").isalnum() and joined.translate(None, _NAME_BYTES):
        raise RuntimeError("Invalid HTTP header name.")
    block = b"".join(lines)
    # What the check leaves of the lines is each line's end, unless a value held more.
    if block.translate(None, _VALUE_BYTES) != b"\r\n" * len(names):
        raise RuntimeError("Invalid HTTP header value.")
    head = [STATUS_LINE[status], block]
    if not cycle.keep_alive and not says_close:
        head.append(b"connection: close\r\n")
    if cycle.chunked_encoding is None and cycle.scope["method"] != "HEAD" and status not in (204, 304):
        cycle.chunked_encoding = True
        head.append(b"transfer-encoding: chunked\r\n")
    head.append(b"\r\n")
    cycle.transport.write(b"".join(head))


class _HeadWithBody:
    """What a request's response is written to. uvicorn writes a response's head when the application
    starts it and its body in another write: two sends, and two wake-ups of the client, where one does
    (measured: the head's send was ~7% of a streamed call's CPU). A head is held until the next write,
    the body's first bytes, which nearly always follow at once, or else the end of the event loop's
    current pass, so a response that starts and then waits still shows its head at once."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            # One send without copying the body (uvloop gathers the two).
            self._transport.writelines((held, data))
        elif data.startswith(b"HTTP/"):
            self._held = data
            self._loop.call_soon(self._release)
        else:
            self._transport.write(data)

    def _release(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self._release()
        self._transport.close()


async def _refusal(message: str, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    body = error_body(message, status=431, code="request_header_fields_too_large")
    await send(
        {
            "type": "http.response.start",
            "status": 431,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _Lingering(asyncio.Protocol):
    """A refused connection's last moments: its answer is written and half-closed; what the client
    still sends is dropped, until it closes its end or _LINGER_S has passed."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._timer = loop.call_later(_LINGER_S, transport.close)
        if transport.can_write_eof():
            transport.write_eof()

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> None:
        self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()
