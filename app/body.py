"""Reading a JSON request body within the configured size limit."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request
from starlette.requests import ClientDisconnect

from app.errors import GatewayError, bad_request


def _too_large(limit: int) -> GatewayError:
    return GatewayError(
        413, f"Request body is larger than the gateway's limit of {limit} bytes.", code="request_too_large"
    )


async def read_body(request: Request, limit: int, declared: str | None) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` (its Content-Length, or the
    bytes received so far)."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
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
