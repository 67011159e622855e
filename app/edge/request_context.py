"""Outermost middleware: gives each request its id and CallRecord, and writes its one access-log line.

Pure ASGI (not BaseHTTPMiddleware), so streamed responses pass through event by event.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from random import getrandbits

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.call.record import STATE_KEY, CallRecord
from app.errors import bad_request
from app.logs import AccessLog, request_id_var

access_log = AccessLog("gateway.access", "request")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:~+/=-]{1,128}")


def new_request_id() -> str:
    """Unique across workers, replicas and restarts without coordination: it keys the usage row. The
    milliseconds since the epoch first, then 80 random bits (`random`, seeded from os.urandom at start
    and again in every forked child, so no two processes share a sequence; not os.urandom itself, a
    system call a request). Time-ordered, so each usage row's key lands at the right-hand end of the
    request_id index rather than anywhere in it: Postgres wrote a batch of events with a quarter less CPU
    than with 128 random bits (docs/performance-log.md, optimisation log), and the index stays
    cache-friendly as the table grows to hundreds of millions of rows."""
    return f"req_{time.time_ns() // 1_000_000:012x}{getrandbits(80):020x}"


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, on_end: Callable[[Scope, CallRecord], None]) -> None:
        self.app = app
        # Metering: called once the response has ended, before the access-log line.
        self.on_end = on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = header(scope, b"x-request-id")
        valid = incoming is None or _REQUEST_ID.fullmatch(incoming) is not None
        call = CallRecord(request_id=new_request_id(), method=scope["method"], path=scope["path"])
        # The client's own id is echoed and logged, and kept on the usage row as client_request_id; the
        # row's request_id, its unique key, is always the gateway's: a client that sends the same id twice
        # (its own retries, say) must not lose the second call's usage.
        request_id = call.request_id
        if incoming is not None and valid:
            request_id = call.client_request_id = incoming
        scope.setdefault("state", {})[STATE_KEY] = call
        token = request_id_var.set(request_id)
        id_header = (b"x-request-id", request_id.encode())

        # The inner send's awaitable itself, not a coroutine awaiting it: a frame less for each of a
        # stream's events.
        def send_with_id(message: Message) -> Awaitable[None]:
            if message["type"] == "http.response.start":
                call.outcome.status_code = message["status"]
                message["headers"] = [*message.get("headers", ()), id_header]
            return send(message)

        try:
            if valid:
                await self.app(scope, receive, send_with_id)
            else:
                error = bad_request(
                    "X-Request-Id must be 1-128 characters of letters, digits and ._:~+/=-",
                    param="X-Request-Id",
                )
                await error.response()(scope, receive, send_with_id)
        finally:
            self.on_end(scope, call)
            if access_log.enabled():
                self._log(call)
            request_id_var.reset(token)

    @staticmethod
    def _log(call: CallRecord) -> None:
        admitted, outcome = call.admitted, call.outcome
        access_log.write(
            {
                "method": call.method,
                "path": call.path,
                "status": outcome.status_code,
                # Hundredths of a millisecond, rounded as round() would, without its formatting
                # and parsing of the decimal digits.
                "latency_ms": int((time.perf_counter() - call.started) * 100_000 + 0.5) / 100,
                "attempts": outcome.attempts,
                "feature": admitted.feature,
                "user": admitted.user_id,
                "model": admitted.model,
                "stream": admitted.stream,
                "client_disconnected": outcome.client_disconnected,
                "error_type": outcome.error_type,
            }
        )
