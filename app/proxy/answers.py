"""Responses made from headers the gateway already holds as lower-case names and string values.

Starlette's Response constructor lower-cases, encodes and scans every header again and looks for the
content type among them; on the metered routes that was a couple of microseconds a call for headers the
gateway built itself (docs/performance-log.md, optimisation log).
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote

from starlette.responses import Response


def raw_headers(headers: Mapping[str, str], media_type: str) -> list[tuple[bytes, bytes]]:
    """`headers` (lower-case names) as ASGI wants them, with the content type."""
    return [(b"content-type", media_type.encode("latin-1")), *encoded(headers)]


def encoded(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    try:
        # The usual headers, all of them latin-1, without a call of _value each.
        return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
    except UnicodeEncodeError:
        return [(name.encode("latin-1"), _value(value)) for name, value in headers.items()]


def _value(value: str) -> bytes:
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        # A client's model name, say, in X-Gateway-Model: percent-encoded UTF-8 rather than a 500.
        return quote(value, safe=_PRINTABLE).encode()


_PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


class RelayedResponse(Response):
    """A whole body with its status, content type and headers, sent as given."""

    def __init__(self, body: bytes, status_code: int, headers: Mapping[str, str], media_type: str) -> None:
        self.body = body
        self.status_code = status_code
        self.background = None
        self.raw_headers = [(b"content-length", str(len(body)).encode()), *raw_headers(headers, media_type)]
