"""Recording what a metered route stores upstream: a response made through POST /v1/responses (stored
unless `store` is false, or in the background) or a chat completion with `store: true`. Either can be
retrieved, listed, changed and deleted later, so it is its creator's alone.

A streamed answer's id arrives in its first event (`response.created`, or the first chunk): the stream is
read up to that event and the owner recorded before any byte of it is relayed.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import orjson
from starlette.responses import Response

from app.errors import GatewayError
from app.ownership.access import Caller
from app.proxy.streaming import EventRelayResponse
from app.proxy.upstream import UpstreamResponse
from app.wire.sse import sse_data

# How much of a stream is read to find its first event; it echoes the request's instructions and tools.
_FIRST_EVENT_LIMIT = 16 * 1024 * 1024


def stored_response(body: dict[str, Any]) -> bool:
    return body.get("store") is not False or body.get("background") is True


def stored_completion(body: dict[str, Any]) -> bool:
    return body.get("store") is True


def record_created(who: Caller | None, kind: str, stored: bool, response: Response) -> Awaitable[None] | None:
    """Record the caller as the owner of the object `response` carries, when the upstream stores it:
    what to await for it, or None when there is nothing to record (nearly every call: no coroutine)."""
    if who is None or not stored or response.status_code >= 300:
        return None
    return _record_created(who, kind, response)


async def _record_created(who: Caller, kind: str, response: Response) -> None:
    if isinstance(response, EventRelayResponse):
        stream = response.upstream.stream
        assert stream is not None
        try:
            response_id = await _streamed_id(response.upstream)
            if response_id is not None:
                await who.record([response_id], kind)
        except BaseException:
            await stream.close()
            raise
        return
    try:
        created: Any = orjson.loads(bytes(response.body))
    except orjson.JSONDecodeError:
        return
    if isinstance(created, dict) and isinstance(created.get("id"), str):
        await who.record([created["id"]], kind)


async def _streamed_id(upstream: UpstreamResponse) -> str | None:
    """The id in the stream's first event that carries one (a Responses event's `response`, a chat
    chunk itself), reading on (and keeping what was read, for the relay) until it has come; None when the
    stream starts with an error instead. Each byte is scanned once (a slow first event must not cost
    quadratic time)."""
    stream = upstream.stream
    assert stream is not None
    buffer = bytearray(upstream.body)
    start = scan = 0
    try:
        while True:
            end = _event_end(buffer, scan)
            if end == -1:
                chunk = await stream.read() if len(buffer) - start <= _FIRST_EVENT_LIMIT else None
                if chunk is None:
                    break
                # A terminator may straddle the chunks: look again from just before the new bytes.
                scan = max(start, len(buffer) - 2)
                buffer += chunk
                continue
            data = sse_data(bytes(buffer[start:end]).replace(b"\r\n", b"\n"))
            start = scan = end
            event: Any = orjson.loads(data) if data else None
            if not isinstance(event, dict):
                continue
            if event.get("type") == "error" or "error" in event:
                return None
            created = event.get("response", event)
            if isinstance(created, dict) and isinstance(created.get("id"), str):
                return str(created["id"])
    except Exception as exc:  # a broken or malformed stream: no id to record, so nothing is relayed
        raise _no_start() from exc
    finally:
        upstream.body = bytes(buffer)
    raise _no_start()


def _event_end(buffer: bytearray, scan: int) -> int:
    """Where the first event ending at or after `scan` ends (past its blank line), or -1. A blank line is
    LF LF or CRLF CRLF, or a mix of them: each contains LF LF or LF CR LF."""
    ends = [
        found + size
        for found, size in ((buffer.find(b"\n\n", scan), 2), (buffer.find(b"\n\r\n", scan), 3))
        if found != -1
    ]
    return min(ends) if ends else -1


def _no_start() -> GatewayError:
    return GatewayError(
        502, "The upstream's stream did not start with the response.", code="upstream_stream_incomplete"
    )
