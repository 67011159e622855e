"""CORS for /v1/*: pages on the origins in GATEWAY_CORS_ORIGINS may call the API with the official JS SDK.

Outermost in the stack, so a preflight is answered before anything counts it as a call (no request id, no
access-log line, no metering, no rate limit), and every answer to an allowed origin carries the headers:
errors from any layer, a 500, SSE streams. A request without an Origin header, or from an origin not on the
list, passes through untouched and gets no CORS header at all: its browser then refuses the page the
answer. Added to the stack only when origins are configured, so the default costs nothing.

No `Access-Control-Allow-Credentials`, ever: the gateway authenticates by the Authorization header, which a
cross-origin fetch may send without credentials mode, and has no cookies a page could ride on. That is
what makes `*` safe to offer.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.edge.canonical_path import path_problem

# What the official JS SDK sends (its x-stainless-* telemetry and retry headers, openai-organization and
# openai-project), plus the gateway's attribution headers and the client's own request id.
_ALLOWED_HEADERS = frozenset(
    {"authorization", "content-type", "accept", "x-feature", "x-user-id", "x-request-id", "idempotency-key"}
)
_ALLOWED_PREFIXES = ("x-stainless-", "openai-")
_ALLOWED_METHODS = b"GET, POST, DELETE"
# What a script may read of an answer beyond the CORS-safelisted headers: the request id, the gateway's
# own headers, the rate limits, and the retry hints the SDK obeys (without x-should-retry a browser's SDK
# would retry on top of the gateway's own retries).
_EXPOSED_NAMES = frozenset({b"x-request-id", b"retry-after", b"retry-after-ms", b"x-should-retry"})
_EXPOSED_PREFIXES = (b"x-gateway-", b"x-ratelimit-")
# Chromium caps a preflight's cache at two hours; ten minutes lets a changed list take effect soon.
_MAX_AGE = b"600"


def requested_headers_allowed(value: str) -> list[str] | None:
    """The names of an Access-Control-Request-Headers value, lower-cased, or None if any is not allowed."""
    names = [name.strip().lower() for name in value.split(",") if name.strip()]
    for name in names:
        if name not in _ALLOWED_HEADERS and not name.startswith(_ALLOWED_PREFIXES):
            return None
    return names


def _exposed(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    names = dict.fromkeys(
        name.lower()
        for name, _ in headers
        if name.lower() in _EXPOSED_NAMES or name.lower().startswith(_EXPOSED_PREFIXES)
    )
    return b", ".join(names)


class Cors:
    """Pure ASGI: answers allowed preflights on /v1/* itself, adds CORS headers to allowed answers."""

    def __init__(self, app: ASGIApp, origins: tuple[str, ...]) -> None:
        self.app = app
        self.any_origin = origins == ("*",)
        self.origins = frozenset(origins)

    def allows(self, origin: str) -> bool:
        return self.any_origin or origin in self.origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        origin = None
        requested_method = requested_headers = None
        for name, value in scope["headers"]:
            if name == b"origin":
                origin = value
            elif name == b"access-control-request-method":
                requested_method = value
            elif name == b"access-control-request-headers":
                requested_headers = value
        if origin is None:
            await self.app(scope, receive, send)
            return
        allowed = self.allows(origin.decode("latin-1"))
        allow_origin = b"*" if self.any_origin else origin
        if scope["method"] == "OPTIONS" and requested_method is not None:
            # Every preflight is answered here, an origin not on the list with a bare 403: none reaches
            # the routes, the limits or the metering.
            await self._preflight(scope, send, allow_origin if allowed else None, requested_headers)
            return
        if not allowed:
            await self.app(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                exposed = _exposed(headers)
                headers.append((b"access-control-allow-origin", allow_origin))
                headers.append((b"vary", b"Origin"))
                if exposed:
                    headers.append((b"access-control-expose-headers", exposed))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_cors)

    @staticmethod
    async def _preflight(
        scope: Scope, send: Send, allow_origin: bytes | None, requested: bytes | None
    ) -> None:
        raw: bytes = scope.get("raw_path") or scope["path"].encode()
        names = requested_headers_allowed(requested.decode("latin-1")) if requested is not None else []
        if allow_origin is None or names is None or path_problem(raw) is not None:
            # An origin not on the list, a header the gateway does not take, or a path it refuses: no CORS
            # headers, so the browser refuses the call and says why in its console.
            await _respond(send, 403, [])
            return
        headers = [
            (b"access-control-allow-origin", allow_origin),
            (b"access-control-allow-methods", _ALLOWED_METHODS),
            (b"access-control-max-age", _MAX_AGE),
            (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
        ]
        if names:
            headers.append((b"access-control-allow-headers", ", ".join(names).encode("latin-1")))
        await _respond(send, 204, headers)


async def _respond(send: Send, status: int, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {"type": "http.response.start", "status": status, "headers": [*headers, (b"content-length", b"0")]}
    )
    await send({"type": "http.response.body", "body": b""})
