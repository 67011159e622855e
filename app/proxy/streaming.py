"""SSE relay: upstream events go to the client as they arrive, byte for byte. The complete events of one
upstream read go out in one write, so a burst of small events costs one send instead of one each
(docs/performance-log.md, optimisation log); nothing is ever held back waiting for more.

Divergences from a plain byte pipe, each deliberate:
1. What the endpoint's dialect (app/wire/) takes out: for chat completions, the gateway always asks the
   upstream for usage (`stream_options.include_usage`); when the client did not ask, the usage-only
   chunk (`choices: []`) is kept back and `"usage":null` is taken out of the other chunks, so client code
   doing `chunk.choices[0]` sees exactly what OpenAI would have sent it.
2. A stream the upstream breaks off (connection lost, read timeout, no `[DONE]`) ends with an OpenAI
   error event, so the SDKs raise instead of returning a silently truncated answer; so does one with an
   event longer than GATEWAY_MAX_EVENT_BYTES, which is cut off there rather than held without limit.
   An event longer than _EARLY_BYTES goes out as it arrives, its last read held back until its end (a
   chunk's usage is last); broken off after its start went out, it is ended where it was cut (the
   client's parser fails on it; a stream that just stopped there would drop it silently).
3. When the client goes away, the upstream response is closed at once so the upstream stops generating
   (and billing) tokens nobody reads.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Mapping
from typing import Any

import orjson
from pyreqwest.exceptions import PyreqwestError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.call.record import CallRecord
from app.errors import error_body, error_response
from app.proxy.answers import encoded, raw_headers
from app.proxy.event_framing import EventFramer
from app.proxy.upstream import UpstreamResponse
from app.wire.dialect import EventInspector

# An event still arriving starts going out once this much of it came (its last read aside), in sends of
# at least as much: the usual event, far shorter, goes out whole in one send, as before.
_EARLY_BYTES = 64 * 1024


def _error_event(message: str, code: str) -> bytes:
    return b"data: " + error_body(message, status=502, code=code) + b"\n\n"


class DisconnectWatch:
    """Cancels the relay at once when the client goes away, so the upstream stops generating (and
    billing) tokens nobody reads. Its task is started only when the relay is about to wait for the
    upstream and the answer has not `ended`: a short stream that arrived whole, [DONE] included, needs no
    task at all, though the relay still reads the upstream to its end so that the connection goes back
    to the pool."""

    def __init__(self) -> None:
        self.gone = False
        self.ended = False
        self._receive: Receive | None = None
        self._relay: asyncio.Task[Any] | None = None
        self._watcher: asyncio.Task[None] | None = None

    def arm(self, receive: Receive) -> None:
        self._receive = receive

    def start(self) -> None:
        """Called by the relay, in its own task, which the watcher cancels."""
        # Once the answer has ended there is nobody left to watch for.
        if self._watcher is None and self._receive is not None and not self.ended:
            self._relay = asyncio.current_task()
            self._watcher = asyncio.get_running_loop().create_task(self._watch(self._receive))

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        # The cancelled task keeps its CancelledError, whose traceback holds the watcher's frame and so
        # this object: were it still to hold the task (and the relay's task), each stream would leave a
        # reference cycle of ~40 objects, its whole request among them, for the collector. With 1,000
        # streams open those collections took 60-90 ms, a stall of every stream (docs/performance-log.md).
        self._watcher = self._relay = self._receive = None

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if self.ended:
            # uvicorn says `http.disconnect` once the response is complete, too: the relay's last send
            # woke the watcher, and the relay goes on reading the upstream to its end. Cancelled there,
            # a whole answer counted as the client's leaving, and the connection was closed instead of
            # going back to the pool (2% of the benchmark's live streams).
            return
        self.gone = True
        if self._relay is not None:
            self._relay.cancel()


KEEPALIVE = b": keep-alive\n\n"


class KeepAlives:
    """Keep-alive comments (`: keep-alive`) for every open stream that has been silent for `interval_s`:
    proxies and load balancers cut connections idle for 60-100 s, and a reasoning model can think longer
    than that before its first token. One ticker per process, every quarter interval, looks at the streams
    open; a stream costs a set entry and a counter bumped per send, never a timer or a task per event. A
    comment goes out after `interval_s` to a quarter more of silence."""

    TICKS = 4

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.streams: set[KeepAlive] = set()
        self._ticker: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.interval_s:
            self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="sse-keepalive")

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker

    def open(self, send: Send) -> KeepAlive:
        keepalive = KeepAlive(self, send)
        self.streams.add(keepalive)
        return keepalive

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s / self.TICKS)
            for keepalive in list(self.streams):
                keepalive.tick()


class KeepAlive:
    """One stream's keep-alive. A comment that is due goes out from a task of its own while the relay
    waits on the upstream; the relay waits for it (`sending` returns it) before its own next send, so the
    two never interleave, and never inside an event that went out in part.

    Should a comment go out before the answer itself started, a stream's start goes first, with none of
    the upstream's headers: the 200 is then committed (see KeepAliveResponse)."""

    __slots__ = ("owner", "partial", "ping", "seen", "send", "sends", "silent", "started")

    def __init__(self, owner: KeepAlives, send: Send) -> None:
        self.owner = owner
        self.send = send
        self.started = False
        self.sends = self.seen = 0
        # -1: the tick right after opening does not count, it may come at once.
        self.silent = -1
        # An event went out in part (its start, not its end): a comment now would land inside it.
        self.partial = False
        self.ping: asyncio.Task[None] | None = None

    def sending(self, partial: bool) -> asyncio.Task[None] | None:
        """The relay is about to send (`partial`: and the client will then have an event in part); it
        must first await the comment returned, if one is going out."""
        self.sends += 1
        self.partial = partial
        return self.ping

    def tick(self) -> None:
        if self.sends != self.seen or self.partial or self.ping is not None:
            self.seen = self.sends
            self.silent = 0
            return
        self.silent += 1
        if self.silent >= KeepAlives.TICKS:
            self.silent = 0
            self.ping = asyncio.get_running_loop().create_task(self._comment())

    async def _comment(self) -> None:
        try:
            if not self.started:
                self.started = True
                await self.send(
                    {"type": "http.response.start", "status": 200, "headers": list(_SSE_RAW_HEADERS)}
                )
            await self.send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})
        except Exception:  # the client has gone: nobody is left to keep the connection open for
            self.owner.streams.discard(self)
        finally:
            self.ping = None

    def pause(self) -> asyncio.Task[None] | None:
        """No more comments; one going out now is returned, to be awaited (let finish). Not a coroutine:
        nearly always there is none, and nothing to await."""
        self.owner.streams.discard(self)
        return self.ping

    def close(self) -> None:
        self.owner.streams.discard(self)
        if self.ping is not None:
            self.ping.cancel()
            self.ping = None


class EventRelayResponse(Response):
    """An SSE response relaying an upstream stream: OpenAI's headers for it, the events sent as they come,
    and a DisconnectWatch that cancels the relay on `http.disconnect` (the relay's `finally` then closes
    the upstream response). sse-starlette was used here first; its constructor alone (an anyio lock
    found through sniffio, a MutableHeaders) took a tenth of the event loop relaying streams, and its
    per-stream task group another quarter (docs/performance-log.md), while the gateway needs none of its event
    formatting or pings: OpenAI sends none, and the bytes are relayed as they are. The relay is a loop in
    the response itself rather than an async generator the response iterates (a generator's every step
    and its closing cost a stream a few microseconds). No cancellation on SIGTERM: open streams finish
    within uvicorn's graceful-shutdown deadline."""

    # As OpenAI sends it (and as Starlette's constructor made it of "text/event-stream").
    media_type = "text/event-stream; charset=utf-8"

    def __init__(
        self,
        upstream: UpstreamResponse,
        call: CallRecord,
        inspect: EventInspector,
        headers: Mapping[str, str],
        max_event_bytes: int,
        keepalives: KeepAlives | None = None,
    ) -> None:
        self.status_code = 200
        self.background = None
        self.raw_headers = [*_SSE_RAW_HEADERS, *encoded(headers)]
        self.upstream = upstream
        self.call = call
        self.inspect = inspect
        self.max_event_bytes = max_event_bytes
        self.keepalives = keepalives
        # Set by a KeepAliveResponse whose comments went out while this answer was awaited.
        self.keepalive: KeepAlive | None = None
        self.watch = DisconnectWatch()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watch = self.watch
        watch.arm(receive)
        keepalive = self.keepalive
        keepalives = self.keepalives
        if (
            keepalive is None
            and keepalives is not None
            and keepalives.interval_s
            and scope["method"] != "HEAD"
        ):
            keepalive = self.keepalive = keepalives.open(send)
        try:
            await self._relay(scope["method"] == "HEAD", send)
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            # Our own cancellation, for a client that left: nothing more to send, and not an error.
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()
        finally:
            watch.stop()
            if keepalive is not None:
                keepalive.close()

    async def _relay(self, head: bool, send: Send) -> None:
        upstream, call, inspect, watch, keepalive = (
            self.upstream,
            self.call,
            self.inspect,
            self.watch,
            self.keepalive,
        )
        stream = upstream.stream
        assert stream is not None
        read_chunk = stream.read_chunk
        framer = EventFramer(self.max_event_bytes)
        chunk: bytes | None = upstream.body
        failure: tuple[str, str] | None = None
        given = 0  # bytes of the event still arriving that went early: the client has its start, not its end
        try:
            if keepalive is not None and (ping := keepalive.sending(False)) is not None:
                await ping
            if keepalive is None or not keepalive.started:
                if keepalive is not None:
                    keepalive.started = True
                await send(
                    {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
                )
            if head:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            while chunk is not None:
                # Anything after the end of the stream ([DONE]) is not part of the answer, but the
                # upstream is still read to its end, so that its connection goes back to the pool.
                if not watch.ended:
                    events = framer.feed(chunk)
                    if events:
                        out = self._relayed(events, given) if given else inspect.relay(events)
                        given = 0
                    elif framer.early_bytes() >= _EARLY_BYTES:
                        out = framer.take_early()
                        given += len(out)
                    else:
                        out = b""
                    if out:
                        call.mark_first_byte()
                    if out or inspect.done:
                        # The last bytes end the response: the chunked terminator goes in the same write.
                        watch.ended = inspect.done
                        if keepalive is not None and (ping := keepalive.sending(given > 0)) is not None:
                            await ping
                        await send({"type": "http.response.body", "body": out, "more_body": not inspect.done})
                    if framer.overflow and not inspect.done:
                        failure = (
                            f"The upstream sent an event longer than {self.max_event_bytes} bytes, "
                            "the gateway's limit (GATEWAY_MAX_EVENT_BYTES).",
                            "upstream_event_too_large",
                        )
                        break
                watch.start()
                raw = await read_chunk()
                chunk = None if raw is None else bytes(raw)
            if failure is None and not inspect.done:
                failure = (
                    "The upstream ended the stream before it was complete.",
                    "upstream_stream_incomplete",
                )
        except asyncio.CancelledError:
            call.outcome.client_disconnected = True
            raise
        except TimeoutError:
            # After the end of the answer only the drain to the upstream's end failed: nothing is missing.
            if not inspect.done:
                failure = ("The upstream stopped sending events (read timeout).", "upstream_stream_timeout")
        except PyreqwestError:
            if not inspect.done:
                failure = ("The upstream connection broke during the stream.", "upstream_stream_broken")
        finally:
            inspect.finish()
            # Read to its end, the connection goes back to the pool; otherwise the upstream is cut off.
            await stream.close()
        if keepalive is not None and (ping := keepalive.pause()) is not None:
            await ping
        if not watch.ended:
            if failure is not None:
                call.outcome.error_type = failure[1]
            body = _error_event(*failure) if failure is not None else b""
            if given:
                body = b"\n\n" + body
            await send({"type": "http.response.body", "body": body, "more_body": False})

    def _relayed(self, events: bytes, early: int) -> bytes:
        """The complete events of a read as relayed, when the first `early` bytes of them went already.
        The inspectors change an event only at its end (the `"usage":null` taken out) or drop a usage
        chunk, which is short in any upstream's shape; one whose start they would change goes on as the
        upstream sent it, since its start went already."""
        # The bytes that went have no blank line: the first one from there ends that event.
        end = events.find(b"\n\n", early - 1) + 2
        first = events if end == len(events) else events[:end]
        out = self.inspect.relay(first)
        rest = out[early:] if out is first or out.startswith(memoryview(first)[:early]) else first[early:]
        return rest if first is events else rest + self.inspect.relay(events[end:])


# What OpenAI sends with a stream: no caching anywhere (`no-cache`, as OpenAI and the SSE spec's examples
# have it), and no buffering in a proxy (nginx's X-Accel-Buffering) between the gateway and the client.
_SSE_HEADERS = {"cache-control": "no-cache", "connection": "keep-alive", "x-accel-buffering": "no"}
# Encoded once: the headers a relayed answer adds (answer_headers) never include these.
_SSE_RAW_HEADERS = raw_headers(_SSE_HEADERS, EventRelayResponse.media_type)


class KeepAliveResponse(Response):
    """A streamed call's answer while the upstream has not answered yet: its retries, fallbacks and first
    bytes can take longer than a proxy waits on a silent connection. For as long as the answer (`answer`,
    the route's work after admission) is awaited, keep-alive comments go out every `interval_s`.

    The first comment commits the 200 and the stream's headers (without the upstream's: none are known
    yet). The gateway's retries and fallbacks go on behind it as before; what changes is how a failure
    that comes after it reaches the client: as an OpenAI error event (`data: {"error": ...}`), which the
    SDKs raise as an APIError, instead of an HTTP error status. An answer that comes before the first
    comment is sent exactly as without keep-alives, so a call that fails fast still gets its 4xx/5xx
    with its headers (Retry-After...) and the SDKs' own retry rules."""

    media_type = EventRelayResponse.media_type

    def __init__(
        self, answer: Coroutine[Any, Any, Response], call: CallRecord, keepalives: KeepAlives
    ) -> None:
        self.status_code = 200
        self.background = None
        self.raw_headers = []
        self.answer = answer
        self.call = call
        self.keepalives = keepalives

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keepalive = self.keepalives.open(send)
        response: Response | None
        try:
            response = await self.answer
        except Exception as exc:
            response = error_response(exc)
        except BaseException:
            keepalive.close()
            raise
        if isinstance(response, EventRelayResponse):
            # Its relay goes on from here, comments between its events included, and closes it.
            response.keepalive = keepalive
            await response(scope, receive, send)
            return
        try:
            if (ping := keepalive.pause()) is not None:
                await ping
            if response is None:
                self.call.outcome.client_disconnected = True
            elif not keepalive.started:
                await response(scope, receive, send)
            else:
                # The client saw a 200; the row keeps the status the call really ended with.
                self.call.outcome.status_code = response.status_code
                await send(
                    {"type": "http.response.body", "body": _failure_event(response), "more_body": False}
                )
        finally:
            keepalive.close()


def _failure_event(response: Response) -> bytes:
    """A failed answer, as the event that ends a stream whose 200 went already."""
    if response.status_code == 499:  # the client has gone
        return b""
    try:
        parsed = orjson.loads(bytes(response.body))
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return b"data: " + orjson.dumps(parsed) + b"\n\n"
    return _error_event(
        f"The upstream answered the stream with status {response.status_code}.", "upstream_not_a_stream"
    )
