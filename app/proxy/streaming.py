"""SSE relay: upstream events go to the client as they arrive, byte for byte. The complete events of one
upstream read go out in one write, so a burst of small events costs one send instead of one each
(docs/performance-log.md, optimisation log); nothing is ever held back waiting for more.

Divergences from a plain byte pipe, each deliberate:
1. The gateway always asks the upstream for usage (`stream_options.include_usage`). When the client did
   not ask, the usage-only chunk (`choices: []`) is kept back and `"usage":null` is taken out of the
   other chunks, so client code doing `chunk.choices[0]` sees exactly what OpenAI would have sent it.
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
from typing import Any, Protocol

import orjson
from pyreqwest.exceptions import PyreqwestError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.call import CallRecord, Usage
from app.errors import error_body, error_response
from app.proxy.answers import encoded, raw_headers
from app.proxy.event_framing import EventFramer
from app.proxy.upstream import UpstreamResponse

DONE = b"[DONE]"
_DONE_EVENT = b"data: [DONE]\n\n"
# An event still arriving starts going out once this much of it came (its last read aside), in sends of
# at least as much: the usual event, far shorter, goes out whole in one send, as before.
_EARLY_BYTES = 64 * 1024


class EventInspector(Protocol):
    done: bool

    def relay(self, block: bytes) -> bytes:
        """Learn what metering needs from the complete events of one upstream read (a block ending with
        a blank line); return the bytes to relay. Events after the end of the stream are dropped."""

    def finish(self) -> None:
        """The stream is over (completed, broken off, or abandoned by the client)."""


def sse_data(event: bytes) -> bytes | None:
    """The data of one SSE event (its `data:` lines joined), or None for comments and data-less events."""
    # One line: its first line end is the blank line's (find, not count: memchr, for a 20 MB event too).
    if event.startswith(b"data: ") and event.find(b"\n", 6) == len(event) - 2:
        return event[6:-2]
    lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


# A chunk with `"usage":null` carries no usage; once the model is known, only its text can matter.
_NO_USAGE = b'"usage":null'
# As the gateway takes it out when the client did not ask for usage (OpenAI puts usage last).
_COMMA_NO_USAGE = b',"usage":null'
_MODEL_KEY = b'"model":"'
# Unparsed chunks kept per stream before their text is collected anyway: memory stays bounded.
_PENDING_MAX_BYTES = 64 * 1024


class ChatChunkInspector:
    """Parses what metering needs and no more: the first chunk (the model), any chunk that may carry usage,
    and the text of the deltas only when it may be needed — no usage came by the end of the stream, or the
    unparsed chunks reached _PENDING_MAX_BYTES (one block longer than that waits alone, until the next
    such block or the end of the stream). A stream that ends with its usage chunk, as OpenAI's do
    when asked, is parsed twice, not once per event, and an ordinary chunk costs a few byte searches
    (streams/s in docs/performance-log.md, optimisation log)."""

    def __init__(self, call: CallRecord, client_wants_usage: bool) -> None:
        self.call = call
        self.client_wants_usage = client_wants_usage
        self.done = False
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        # A block kept past _PENDING_MAX_BYTES (a huge event, mostly), unparsed, and where its text goes
        # among the completion's parts: inspecting a 20 MB chunk held the event loop for 85-280 ms,
        # mostly this parse, for text that the usage chunk still to come makes needless. One at a time,
        # so memory stays bounded.
        self._large: tuple[int, bytes] | None = None

    def relay(self, block: bytes) -> bytes:
        if self.call.outcome.upstream_model is None:
            self._sniff_model(block)
        if block.endswith(_DONE_EVENT) and (last := self._last_read(block)) is not None:
            return last
        # The usual read of a live stream: ordinary chunks only (most often one), kept and relayed whole.
        out = self._ordinary(block)
        if out is not None:
            self._keep(block)
        else:
            out = self._events(block)
        if self._pending_bytes > _PENDING_MAX_BYTES:
            self._collect_pending()
        return out

    def _events(self, block: bytes) -> bytes:
        """A read of any other shape: runs of ordinary chunks kept whole, the other events parsed."""
        relayed: list[bytes] = []
        start = 0
        runs = True
        while not self.done and (end := block.find(b"\n\n", start)) != -1:
            if runs:
                # A stream that arrives at once is its first chunk, a run of ordinary chunks (kept
                # whole), then its usage chunk and [DONE].
                run_end, out = self._ordinary_run(block, start)
                if out is not None:
                    self._keep(block[start:run_end])
                    relayed.append(out)
                    start = run_end
                    continue
                # Not runs of that shape: event by event for the rest of this read, so a read that
                # mixes ordinary and other events costs one search per event, not one per byte.
                runs = self.call.outcome.upstream_model is None  # the first chunk is inspected first
            event = block[start : end + 2]
            start = end + 2
            out = self._ordinary(event)
            if out is not None:
                self._keep(event)
            else:
                out = self._inspected(event)
            if out is not None:
                relayed.append(out)
        return b"".join(relayed)

    def _last_read(self, block: bytes) -> bytes | None:
        """The usual last read of a stream, or a whole short one, at once: ordinary chunks (or none), one
        more event (the usage chunk, when asked for) and [DONE]. None for any other shape."""
        end = len(block) - len(_DONE_EVENT)
        if end < 2 or self.call.outcome.upstream_model is None or self.done:
            return None
        # Where the event before [DONE] starts: after the blank line before it, if there is one.
        before = block.rfind(b"\n\n", 0, end - 2)
        start = before + 2 if before != -1 else 0
        run = block[:start]
        out = self._ordinary(run) if run else b""
        if out is None:
            return None
        if run:
            self._keep(run)
        event = self._inspected(block[start:end]) or b""
        self.done = True
        return out + event + _DONE_EVENT

    def _sniff_model(self, block: bytes) -> None:
        """The model, read from the bytes of the first chunk, so that it can go unparsed like the rest.
        `"model":"` occurs unescaped only as a chunk's own key (inside a JSON string its quotes would be
        escaped), and every chunk of a stream names the same model. Anything unusual is left to the
        parse (`_inspect`)."""
        at = block.find(_MODEL_KEY)
        if at == -1:
            return
        at += len(_MODEL_KEY)
        end = block.find(b'"', at)
        name = block[at:end] if end != -1 else b""
        if name and b"\\" not in name:
            try:
                self.call.outcome.upstream_model = name.decode()
            except UnicodeDecodeError:
                return

    def _ordinary_run(self, block: bytes, start: int) -> tuple[int, bytes | None]:
        """Where the events from `start` to the last chunk without usage end, and those events as
        relayed, if all of them are ordinary; else `start` and None."""
        last = block.rfind(_NO_USAGE, start)
        end = block.find(b"\n\n", last) if last != -1 else -1
        out = self._ordinary(block[start : end + 2]) if end != -1 else None
        return (end + 2, out) if out is not None else (start, None)

    def _ordinary(self, events: bytes) -> bytes | None:
        """`events` as relayed if they are only chunks without usage, once the model is known: nothing
        metering needs now; else None. Each event ends with a blank line, so twice as many newlines as
        `"usage":null`s means one-line events each carrying one (a chunk names its usage once). When the
        client did not ask for usage, the `,"usage":null` that only the gateway asked for is taken out,
        and the replacement counts them (counting one byte is the cheap search)."""
        if self.call.outcome.upstream_model is None or self.done:
            return None
        if self.client_wants_usage:
            out, nulls = events, events.count(_NO_USAGE)
        else:
            out = events.replace(_COMMA_NO_USAGE, b"")
            nulls = (len(events) - len(out)) // len(_COMMA_NO_USAGE)
        if not nulls:
            return None
        # One event of one line: its first newline is its blank line (memchr; counting the newlines of a
        # 20 MB event takes 10 ms).
        if nulls == 1 and events.find(b"\n") == len(events) - 2:
            return out
        return out if events.count(b"\n") == 2 * nulls else None

    def _keep(self, events: bytes) -> None:
        """Kept unparsed, for their text in case no usage comes."""
        if len(events) > _PENDING_MAX_BYTES:
            # What came before it is collected first, so the text keeps its order.
            self._collect_pending()
            self._collect_large()
            self._large = (len(self.call.outcome.completion_parts), events)
            return
        self._pending.append(events)
        self._pending_bytes += len(events)

    def _inspected(self, event: bytes) -> bytes | None:
        """One event parsed for what metering needs, as relayed (None: not the client's to see)."""
        out = self._inspect(event)
        if out is None or self.client_wants_usage:
            return out
        return out.replace(_COMMA_NO_USAGE, b"")

    def _inspect(self, event: bytes) -> bytes | None:
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
        if call.outcome.upstream_model is None and isinstance(chunk.get("model"), str):
            call.outcome.upstream_model = chunk["model"]
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            call.outcome.usage = Usage.from_openai(usage)
            call.outcome.learn_tier(chunk)
            # The usage counts the whole completion: the text kept for counting it is not needed.
            self._pending.clear()
            self._large = None
        else:
            self._collect_pending()
        choices = chunk.get("choices")
        if isinstance(choices, list):
            _collect_choices(choices, call.outcome.completion_parts)
            if not choices and isinstance(usage, dict) and not self.client_wants_usage:
                return None
        return event

    def finish(self) -> None:
        if self.call.outcome.usage is None:
            self._collect_pending()
            self._collect_large()
        self._pending.clear()
        self._large = None

    def _collect_pending(self) -> None:
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        for block in pending:
            _collect_block(block, self.call.outcome.completion_parts)

    def _collect_large(self) -> None:
        if self._large is not None:
            (at, block), self._large = self._large, None
            parts: list[str] = []
            _collect_block(block, parts)
            self.call.outcome.completion_parts[at:at] = parts


def _collect_block(block: bytes, parts: list[str]) -> None:
    """The text of a block of chunks kept unparsed. Each event is cut out of it, not split off and given
    its blank line back (three copies of a 20 MB chunk)."""
    start = 0
    while (end := block.find(b"\n\n", start) + 2) > 1:
        data = sse_data(block[start:end])
        start = end
        if data is None:
            continue
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        choices = chunk.get("choices") if isinstance(chunk, dict) else None
        if isinstance(choices, list):
            _collect_choices(choices, parts)


def _collect_choices(choices: list[object], parts: list[str]) -> None:
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict):
            collect_text(delta, parts)


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
        """Called by the response in the task that relays."""
        self._receive = receive
        self._relay = asyncio.current_task()

    def start(self) -> None:
        # Once the answer has ended there is nobody left to watch for.
        if self._watcher is None and self._receive is not None and not self.ended:
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
        self.gone = True
        if self._relay is not None:
            self._relay.cancel()


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

    def relay(self, block: bytes) -> bytes:
        start = 0
        while not self.done and (end := block.find(b"\n\n", start)) != -1:
            self._inspect(block[start : end + 2])
            start = end + 2
        return block[:start]

    def _inspect(self, event: bytes) -> None:
        data = sse_data(event)
        if data is None:
            return
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(payload, dict):
            return
        kind = payload.get("type")
        if kind in _TEXT_DELTAS and isinstance(payload.get("delta"), str):
            self.call.outcome.completion_parts.append(payload["delta"])
        elif isinstance(payload.get("response"), dict):
            learn_response(self.call, payload["response"])
        if kind in _TERMINAL or kind == "error":
            self.done = True

    def finish(self) -> None:
        return None


def learn_response(call: CallRecord, response: dict[str, Any]) -> None:
    """What metering needs from a Responses API object: its model, its usage, and for a background
    response its id, under which it is metered once however often it is streamed or polled."""
    if isinstance(response.get("model"), str):
        call.outcome.upstream_model = response["model"]
    if isinstance(response.get("usage"), dict):
        call.outcome.usage = Usage.from_openai(response["usage"])
        call.outcome.learn_tier(response)
    if response.get("background") is True and isinstance(response.get("id"), str):
        call.outcome.usage_key = response["id"]
        created = response.get("created_at")
        if isinstance(created, int | float) and not isinstance(created, bool) and created > 0:
            # The row's created_at is the response's own, whichever poll meters it: with the id, the key
            # that keeps a response to one row however many processes see it finished.
            call.outcome.usage_created_at = float(created)


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

    async def pause(self) -> None:
        """No more comments; one going out now is let finish."""
        self.owner.streams.discard(self)
        if self.ping is not None:
            await self.ping

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
                chunk = await stream.read()
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
        if keepalive is not None:
            await keepalive.pause()
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
            try:
                response = await self.answer
            except Exception as exc:
                response = error_response(exc)
            if isinstance(response, EventRelayResponse):
                # Its relay goes on from here, comments between its events included.
                response.keepalive = keepalive
                await response(scope, receive, send)
                return
            await keepalive.pause()
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
