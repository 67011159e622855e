"""One spelling per path: requests whose path is not in canonical form are refused before auth and routing,
and the paths sent upstream are built from percent-encoded segments.

Why refuse rather than normalise: the router matches the path as the client spelled it, while the upstream
HTTP client resolves it by WHATWG URL rules (dot segments, `%2e`, backslashes). `/v1/./chat/completions`
missed the metered route, went through the passthrough and reached the upstream's
`/v1/chat/completions`, unmetered and outside model policy; `/v1/%2e%2e/x` reached paths outside the
upstream's `/v1` with the gateway's key attached. No OpenAI SDK sends such a path, so refusing them costs
no client anything and leaves nothing for two parsers to disagree about.

Refused with 400 `invalid_path`: dot segments (`.` and `..`, raw or percent-encoded), an encoded `/` or
`\\`, any backslash, empty segments (`//`, a trailing `/`), control characters, raw bytes outside
printable ASCII, malformed percent-escapes and escapes that are not UTF-8.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable
from urllib.parse import quote, unquote_to_bytes

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import GatewayError

# A path none of these match is canonical as it stands: the full check runs only for the rest, so the
# usual request pays for one regex search.
_SUSPECT = re.compile(rb"[^!$&'()*+,\-./0-9:;=@A-Z_a-z~]|//|/\.\.?(?:/|$)|/$")
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
# RFC 3986 pchar, less '%': what a segment may hold unencoded in the URL sent upstream.
_SEGMENT_SAFE = "!$&'()*+,;=:@-._~"
_SHOWN = 200


def path_problem(raw_path: bytes) -> str | None:
    """What makes `raw_path` (the request target's path, as sent) non-canonical, or None."""
    if not raw_path.startswith(b"/"):
        return "it does not start with '/'"
    if raw_path == b"/" or _SUSPECT.search(raw_path) is None:
        return None
    for segment in raw_path[1:].split(b"/"):
        if not segment:
            return "it has an empty segment ('//' or a trailing '/')"
        if _BAD_ESCAPE.search(segment):
            return "it has a malformed percent-escape"
        if any(byte < 0x21 or byte > 0x7E for byte in segment):
            return "it has a character that must be percent-encoded"
        try:
            decoded = unquote_to_bytes(segment).decode("utf-8")
        except UnicodeDecodeError:
            return "a percent-escape in it is not UTF-8"
        if decoded in (".", ".."):
            return "it has a dot segment ('.' or '..')"
        if "/" in decoded or "\\" in decoded:
            return "it has a backslash or an encoded '/' or '\\'"
        if not decoded.isprintable():
            return "it has a control character"
    return None


def invalid_path(problem: str, shown: str) -> GatewayError:
    if len(shown) > _SHOWN:
        shown = shown[:_SHOWN] + "…"
    return GatewayError(
        400,
        f"Invalid request path '{shown}': {problem}. Send the path as the OpenAI API spells it.",
        code="invalid_path",
    )


def upstream_path(*segments: str) -> str:
    """`/seg/seg…`, each (decoded) segment percent-encoded: whatever a segment holds, it cannot become a
    separator, a dot segment, a query or a fragment in the URL sent upstream."""
    for segment in segments:
        if segment in ("", ".", ".."):
            raise invalid_path("it has an empty or dot segment", "/".join(segments))
    return "".join("/" + quote(segment, safe=_SEGMENT_SAFE) for segment in segments)


class CanonicalPath:
    """Pure ASGI: answers 400 for a non-canonical path; everything else passes through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # The application's (or the refusal's) coroutine itself, not one awaiting it: a frame less for
        # the rest of the request to pass through at each of its waits.
        if scope["type"] == "http":
            # raw_path is what the client sent; `path` is already percent-decoded (and may be all a
            # server gives: encode it back, so the same rules apply to what it holds).
            raw: bytes | None = scope.get("raw_path")
            if raw is None:
                raw = quote(scope["path"], safe="/" + _SEGMENT_SAFE).encode()
            problem = path_problem(raw)
            if problem is not None:
                shown = raw.decode("latin-1").encode("unicode_escape").decode("ascii")
                return invalid_path(problem, shown).response()(scope, receive, send)
        return self.app(scope, receive, send)
