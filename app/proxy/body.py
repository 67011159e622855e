"""Reading a request body within the configured size limit, its Content-Encoding undone."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import Request
from starlette.requests import ClientDisconnect

from app.errors import GatewayError, bad_request


def _too_large(limit: int) -> GatewayError:
    return GatewayError(
        413, f"Request body is larger than the gateway's limit of {limit} bytes.", code="request_too_large"
    )


# zlib's wbits for each coding (RFC 9110 §8.4.1): gzip's container, and deflate's, which is zlib's.
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class BodyDecoder:
    """A request body's Content-Encoding undone as it arrives, `limit` applied to the decoded bytes: a
    small compressed body that inflates past the limit (a decompression bomb) is refused as soon as it
    does, having never been held whole."""

    def __init__(self, wbits: int, limit: int, too_large: Callable[[], GatewayError]) -> None:
        self._inflate = zlib.decompressobj(wbits)
        self._left = limit
        self._too_large = too_large

    def feed(self, chunk: bytes) -> bytes:
        if self._inflate.eof:
            if chunk:
                raise _corrupt()
            return b""
        try:
            # At most one byte past what is left: enough to know the limit is passed.
            decoded = self._inflate.decompress(chunk, self._left + 1)
        except zlib.error:
            raise _corrupt() from None
        self._left -= len(decoded)
        if self._left < 0:
            raise self._too_large()
        if self._inflate.unused_data:  # bytes after the end of the compressed stream
            raise _corrupt()
        return decoded

    def end(self) -> None:
        if not self._inflate.eof:
            raise _corrupt()


def body_decoder(
    encoding: str | None, limit: int, too_large: Callable[[], GatewayError]
) -> BodyDecoder | None:
    """The decoder for a Content-Encoding header's value; None for a body sent as it is. 415 for a
    coding the gateway does not undo: it forwards no encoded body (the upstream would read it as plain)."""
    if encoding is None:
        return None
    coding = encoding.strip().lower()
    if coding in ("", "identity"):
        return None
    wbits = _WBITS.get(coding)
    if wbits is None:
        raise GatewayError(
            415,
            f"Content-Encoding '{encoding}' is not supported; send the body as it is, or gzip or deflate it.",
            param="Content-Encoding",
            code="unsupported_content_encoding",
        )
    return BodyDecoder(wbits, limit, too_large)


def _corrupt() -> GatewayError:
    return bad_request(
        "The request body could not be decoded as its Content-Encoding says.",
        param="Content-Encoding",
        code="invalid_content_encoding",
    )


async def read_body(request: Request, limit: int, declared: str | None, encoding: str | None = None) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` (its Content-Length, or the
    bytes received so far; decoded bytes when it came with a Content-Encoding)."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    if encoding is not None and (decoder := body_decoder(encoding, limit, lambda: _too_large(limit))):
        return await _read_decoded(request, decoder)
    chunks: list[bytes] = []
    size = 0
    receive = request.receive
    while True:
        # Straight from ASGI rather than through Request.stream(), an async generator per request.
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _read_decoded(request: Request, decoder: BodyDecoder) -> bytes:
    chunks: list[bytes] = []
    async for chunk in request.stream():
        chunks.append(decoder.feed(chunk))
    decoder.end()
    return b"".join(chunks)


def parse_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_request(
            "We could not parse the JSON body of your request. The body must be a JSON object."
        ) from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body
