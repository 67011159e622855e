"""SSE relay: upstream events go to the client one by one, as they arrive, byte for byte.

Divergences from a plain byte pipe, each deliberate:
1. The gateway always asks the upstream for usage (`stream_options.include_usage`). When the client did
   not ask, the usage-only chunk (`choices: []`) is kept back and `"usage":null` is taken out of the
   other chunks, so client code doing `chunk.choices[0]` sees exactly what OpenAI would have sent it.
2. A stream the upstream breaks off (connection lost, read timeout, no `[DONE]`) ends with an OpenAI
   error event, so the SDKs raise instead of returning a silently truncated answer.
3. When the client goes away, the upstream response is closed at once so the upstream stops generating
   (and billing) tokens nobody reads (ARCHITECTURE.md, pitfall 2).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Protocol

import aiohttp
import orjson
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from app.call import CallRecord, Usage
from app.errors import error_body
from app.upstream import UpstreamResponse

DONE = b"[DONE]"


class EventInspector(Protocol):
    done: bool

    def __call__(self, event: bytes) -> bytes | None:
        """Learn what metering needs from one event; return the bytes to relay, or None to keep it back."""


def sse_data(event: bytes) -> bytes | None:
    """The data of one SSE event (its `data:` lines joined), or None for comments and data-less events."""
    if event.startswith(b"data: ") and event.count(b"\n") == 2:
        return event[6:-2]
    lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


class ChatChunkInspector:
    def __init__(self, call: CallRecord, client_wants_usage: bool) -> None:
        self.call = call
        self.client_wants_usage = client_wants_usage
        self.done = False

    def __call__(self, event: bytes) -> bytes | None:
        data = sse_data(event)
        if data is None:
            return event
        if data == DONE:
            self.done = True
            return event
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return event
        if not isinstance(chunk, dict):
            return event
        call = self.call
        if call.upstream_model is None and isinstance(chunk.get("model"), str):
            call.upstream_model = chunk["model"]
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            call.usage = Usage.from_openai(usage)
        choices = chunk.get("choices")
        if isinstance(choices, list):
            self._collect(choices)
            if not choices and isinstance(usage, dict) and not self.client_wants_usage:
                return None
        if not self.client_wants_usage:
            return event.replace(b',"usage":null', b"")
        return event

    def _collect(self, choices: list[object]) -> None:
        for choice in choices:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict):
                collect_text(delta, self.call.completion_parts)


def collect_text(message: dict[str, Any], parts: list[str]) -> None:
    """The generated text of a message or delta (content, tool-call names and arguments), kept so
    metering can count completion tokens when no usage ever arrives."""
    content = message.get("content")
    if isinstance(content, str) and content:
        parts.append(content)
    tool_calls = message.get("tool_calls")
    for tool_call in tool_calls if isinstance(tool_calls, list) else ():
        function = tool_call.get("function") if isinstance(tool_call, dict) else None
        if isinstance(function, dict):
            parts.extend(function[key] for key in ("name", "arguments") if isinstance(function.get(key), str))


def _error_event(message: str, code: str) -> bytes:
    return b"data: " + error_body(message, status=502, code=code) + b"\n\n"


async def relay_sse(
    upstream: UpstreamResponse, call: CallRecord, inspect: EventInspector
) -> AsyncIterator[bytes]:
    response = upstream.stream
    assert response is not None
    buffer = upstream.body
    failure: tuple[str, str] | None = None
    try:
        while True:
            if b"\r" in buffer:
                buffer = buffer.replace(b"\r\n", b"\n")
            start = 0
            while (end := buffer.find(b"\n\n", start)) != -1:
                event = buffer[start : end + 2]
                start = end + 2
                # Anything after [DONE] is not part of the answer.
                out = None if inspect.done else inspect(event)
                if out is not None:
                    call.mark_first_byte()
                    yield out
            buffer = buffer[start:]
            chunk = await response.content.readany()
            if not chunk:
                break
            buffer += chunk
        if not inspect.done:
            failure = ("The upstream ended the stream before it was complete.", "upstream_stream_incomplete")
    except (asyncio.CancelledError, GeneratorExit):
        call.client_disconnected = True
        raise
    except (TimeoutError, aiohttp.ServerTimeoutError):
        failure = ("The upstream stopped sending events (read timeout).", "upstream_stream_timeout")
    except aiohttp.ClientError:
        failure = ("The upstream connection broke during the stream.", "upstream_stream_broken")
    finally:
        if inspect.done:
            response.release()
        else:
            response.close()
    if failure is not None:
        call.error_type = failure[1]
        yield _error_event(*failure)


# Responses API stream events that end a response; each carries the final response object with its usage.
_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_TEXT_DELTAS = frozenset(
    {"response.output_text.delta", "response.function_call_arguments.delta", "response.refusal.delta"}
)


class ResponsesEventInspector:
    """Responses API events (`event: <type>` + `data: {...}`): relayed unchanged; usage from the terminal
    event's response. These streams end without `[DONE]`; the terminal event (or `error`) is the end."""

    def __init__(self, call: CallRecord) -> None:
        self.call = call
        self.done = False

    def __call__(self, event: bytes) -> bytes | None:
        data = sse_data(event)
        if data is None:
            return event
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            return event
        if not isinstance(payload, dict):
            return event
        kind = payload.get("type")
        if kind in _TEXT_DELTAS and isinstance(payload.get("delta"), str):
            self.call.completion_parts.append(payload["delta"])
        elif isinstance(payload.get("response"), dict):
            learn_response(self.call, payload["response"])
        if kind in _TERMINAL or kind == "error":
            self.done = True
        return event


def learn_response(call: CallRecord, response: dict[str, Any]) -> None:
    """What metering needs from a Responses API object: its model, its usage, and for a background
    response its id, under which it is metered once however often it is streamed or polled."""
    if isinstance(response.get("model"), str):
        call.upstream_model = response["model"]
    if isinstance(response.get("usage"), dict):
        call.usage = Usage.from_openai(response["usage"])
    if response.get("background") is True and isinstance(response.get("id"), str):
        call.usage_key = response["id"]


class EventRelayResponse(EventSourceResponse):
    """sse-starlette's EventSourceResponse (its headers, its HEAD handling), relaying with one watcher
    task instead of a task group of four and a cancel scope around every event: those took a quarter of
    the event loop when relaying streams (bench/README.md). Events are sent as they come; an
    `http.disconnect` cancels the relay at once, and the relay's `finally` closes the upstream response.
    No keep-alive pings (OpenAI sends none) and no cancellation on SIGTERM: open streams finish within
    uvicorn's graceful-shutdown deadline."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] == "HEAD":
            await super().__call__(scope, receive, send)
            return
        relay = asyncio.current_task()
        assert relay is not None
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            relay.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        body = self.body_iterator
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            async for chunk in body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone.is_set():
                raise
            # Our own cancellation, for a client that left: nothing more to send, and not an error.
            relay.uncancel()
        finally:
            watcher.cancel()
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()
        if self.background is not None:
            await self.background()
