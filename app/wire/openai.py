"""OpenAI's wire format, as the gateway reads it: the usage object in its spellings, the service tier,
error answers, chat completion chunks (with the `include_usage` splice) and the Responses API's events.

One dialect per kind of answer: `CHAT` (chat completions, JSON or chunks), `RESPONSES` (the Responses API,
JSON or typed events), `JSON` (any other endpoint whose JSON answer may report usage: embeddings, legacy
completions, audio, images). app/wire/endpoints.py says which endpoint speaks which.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from app.call.record import Usage
from app.wire.dialect import EventInspector, Outcome, Payload, Prompt
from app.wire.sse import sse_data

DONE = b"[DONE]"
_DONE_EVENT = b"data: [DONE]\n\n"
_MAX_TIER_CHARS = 32


def usage_of(usage: dict[str, Any]) -> Usage:
    """Chat/embeddings usage (prompt_/completion_tokens) or Responses usage (input_/output_tokens)."""
    get = usage.get
    prompt = _int(get("prompt_tokens") if "prompt_tokens" in usage else get("input_tokens"))
    completion = _int(get("completion_tokens") if "completion_tokens" in usage else get("output_tokens"))
    # Realtime and transcription usage spell it `input_token_details`.
    prompt_details = _details(
        get("prompt_tokens_details") or get("input_tokens_details") or get("input_token_details")
    )
    completion_details = _details(
        get("completion_tokens_details") or get("output_tokens_details") or get("output_token_details")
    )
    total = get("total_tokens")
    return Usage(
        prompt,
        completion,
        prompt + completion if total is None else _int(total),
        _int(prompt_details.get("cached_tokens")),
        _int(completion_details.get("reasoning_tokens")),
        _int(prompt_details.get("audio_tokens")),
        _int(completion_details.get("audio_tokens")),
        _int(prompt_details.get("image_tokens")),
        _int(completion_details.get("image_tokens")),
    )


_NO_DETAILS: dict[str, Any] = {}


def _details(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else _NO_DETAILS


def _int(value: object) -> int:
    # type() rather than isinstance(): True is an int too, and not a token count.
    return value if type(value) is int and value >= 0 else 0


def _learn_tier(outcome: Outcome, answer: dict[str, Any]) -> None:
    """The service tier an answer (a completion, a chunk, a response) reports. Bounded: it is stored."""
    tier = answer.get("service_tier")
    if isinstance(tier, str) and 0 < len(tier) <= _MAX_TIER_CHARS:
        outcome.service_tier = tier


def error_type(status: int, body: bytes) -> str:
    """An error answer's `error.code`, else its `error.type`, else `upstream_<status>`."""
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        error = None
    value = (error.get("code") or error.get("type")) if isinstance(error, dict) else None
    return value if isinstance(value, str) else f"upstream_{status}"


def read_answer(outcome: Outcome, answer: bytes) -> dict[str, Any] | None:
    """Learn the model and usage from a JSON answer; keep its text when it carries no usage."""
    try:
        parsed: Any = orjson.loads(answer)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    if isinstance(parsed.get("model"), str):
        outcome.upstream_model = parsed["model"]
    if isinstance(parsed.get("usage"), dict):
        outcome.usage = usage_of(parsed["usage"])
        _learn_tier(outcome, parsed)
        return parsed
    choices = parsed.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict):
            collect_text(message, outcome.completion_parts)
    return parsed


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

    def __init__(self, outcome: Outcome, client_wants_usage: bool) -> None:
        self.outcome = outcome
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
        if self.outcome.upstream_model is None:
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
                runs = self.outcome.upstream_model is None  # the first chunk is inspected first
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
        if end < 2 or self.outcome.upstream_model is None or self.done:
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
        if name and name.find(b"\\") == -1:  # not `in`: see EventFramer.feed
            try:
                self.outcome.upstream_model = name.decode()
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
        and taking them out counts them (counting one byte is the cheap search)."""
        if self.outcome.upstream_model is None or self.done:
            return None
        if self.client_wants_usage:
            out, nulls = events, events.count(_NO_USAGE)
        elif len(events) <= _PENDING_MAX_BYTES:
            # Split and joined: one search of the events, where replace() searches them twice (it counts
            # first), for the same bytes (2.24 -> 1.49 us for a short stream's read, measured). Not for a
            # long read: the parts would be a second copy of it until they are joined.
            parts = events.split(_COMMA_NO_USAGE)
            out, nulls = b"".join(parts), len(parts) - 1
        else:
            out = events.replace(_COMMA_NO_USAGE, b"")
            nulls = (len(events) - len(out)) // len(_COMMA_NO_USAGE)
        if not nulls:
            return None
        # One event of one line: its first newline is its blank line (memchr; counting the newlines of a
        # 20 MB event takes 10 ms).
        if nulls == 1 and events.find(b"\n") == len(events) - 2:
            return out
        # The newlines counted by what deleting them takes away: that finds each with memchr, where
        # count() compares byte by byte (12,000 instructions of a 790,000-instruction stream).
        return out if len(events) - len(events.replace(b"\n", b"")) == 2 * nulls else None

    def _keep(self, events: bytes) -> None:
        """Kept unparsed, for their text in case no usage comes."""
        if len(events) > _PENDING_MAX_BYTES:
            # What came before it is collected first, so the text keeps its order.
            self._collect_pending()
            self._collect_large()
            self._large = (len(self.outcome.completion_parts), events)
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
        outcome = self.outcome
        if outcome.upstream_model is None and isinstance(chunk.get("model"), str):
            outcome.upstream_model = chunk["model"]
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            outcome.usage = usage_of(usage)
            _learn_tier(outcome, chunk)
            # The usage counts the whole completion: the text kept for counting it is not needed.
            self._pending.clear()
            self._large = None
        else:
            self._collect_pending()
        choices = chunk.get("choices")
        if isinstance(choices, list):
            _collect_choices(choices, outcome.completion_parts)
            if not choices and isinstance(usage, dict) and not self.client_wants_usage:
                return None
        return event

    def finish(self) -> None:
        if self.outcome.usage is None:
            self._collect_pending()
            self._collect_large()
        self._pending.clear()
        self._large = None

    def _collect_pending(self) -> None:
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        for block in pending:
            _collect_block(block, self.outcome.completion_parts)

    def _collect_large(self) -> None:
        if self._large is not None:
            (at, block), self._large = self._large, None
            parts: list[str] = []
            _collect_block(block, parts)
            self.outcome.completion_parts[at:at] = parts


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


# Responses API stream events that end a response; each carries the final response object with its usage.
_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_TEXT_DELTAS = frozenset(
    {"response.output_text.delta", "response.function_call_arguments.delta", "response.refusal.delta"}
)


class ResponsesEventInspector:
    """Responses API events (`event: <type>` + `data: {...}`): relayed unchanged; usage from the terminal
    event's response. These streams end without `[DONE]`; the terminal event (or `error`) is the end."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome
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
            self.outcome.completion_parts.append(payload["delta"])
        elif isinstance(payload.get("response"), dict):
            learn_response(self.outcome, payload["response"])
        if kind in _TERMINAL or kind == "error":
            self.done = True

    def finish(self) -> None:
        return None


def learn_response(outcome: Outcome, response: dict[str, Any]) -> None:
    """What metering needs from a Responses API object: its model, its usage, and for a background
    response its id, under which it is metered once however often it is streamed or polled."""
    if isinstance(response.get("model"), str):
        outcome.upstream_model = response["model"]
    if isinstance(response.get("usage"), dict):
        outcome.usage = usage_of(response["usage"])
        _learn_tier(outcome, response)
    if response.get("background") is True and isinstance(response.get("id"), str):
        outcome.usage_key = response["id"]
        created = response.get("created_at")
        if isinstance(created, int | float) and not isinstance(created, bool) and created > 0:
            # The row's created_at is the response's own, whichever poll meters it: with the id, the key
            # that keeps a response to one row however many processes see it finished.
            outcome.usage_created_at = float(created)


class JsonAnswers:
    """An endpoint answered with one JSON object that may report `usage` (embeddings, legacy completions,
    audio, images); its prompt, if the gateway must count it, is its `input`."""

    def streamed(self, body: Mapping[str, Any]) -> bool:
        return body.get("stream") is True

    def payload(self, raw: bytes, body: dict[str, Any], *, modified: bool, stream: bool) -> Payload:
        return Payload(raw, body, modified=modified)

    def requested_model(self, raw: bytes) -> str | None:
        try:
            sent = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        model = sent.get("model") if isinstance(sent, dict) else None
        return model if isinstance(model, str) else None

    def read_answer(self, outcome: Outcome, answer: bytes) -> dict[str, Any] | None:
        return read_answer(outcome, answer)

    def error_type(self, status: int, body: bytes) -> str:
        return error_type(status, body)

    def prompt(self, body: Mapping[str, Any]) -> Prompt:
        return Prompt(input=body.get("input", ""))


# Appended to the client's own bytes when it set no stream_options: re-serialising the whole body would
# cost orjson a few microseconds per kilobyte of prompt on every streamed call.
_WITH_USAGE = b',"stream_options":{"include_usage":true}}'


class ChatCompletions(JsonAnswers):
    """Chat completions: a streamed one always asks the upstream for its usage chunk."""

    def payload(self, raw: bytes, body: dict[str, Any], *, modified: bool, stream: bool) -> Payload:
        """A stream asks for its usage chunk (`stream_options.include_usage`); the payload says whether
        the client itself asked for it. Options that are not an object are refused before this."""
        if not stream:
            return Payload(raw, body, modified=modified)
        options = body.get("stream_options")
        client_wants_usage = bool(options and options.get("include_usage") is True)
        body["stream_options"] = {**(options or {}), "include_usage": True}
        if not modified:
            if client_wants_usage:
                return Payload(raw, body)
            stripped = raw.rstrip()
            # A non-empty object (it has messages) without the key: adding it keeps the JSON valid.
            if options is None and stripped.endswith(b"}"):
                return Payload(stripped[:-1] + _WITH_USAGE, body, client_wants_usage=False)
        return Payload(raw, body, modified=True, client_wants_usage=client_wants_usage)

    def inspector(self, outcome: Outcome, payload: Payload | None) -> EventInspector:
        return ChatChunkInspector(outcome, payload is None or payload.client_wants_usage)

    def prompt(self, body: Mapping[str, Any]) -> Prompt:
        return Prompt(chat=body)


class Responses(JsonAnswers):
    """The Responses API: typed events when streamed; its input counted as chat messages."""

    def inspector(self, outcome: Outcome, payload: Payload | None) -> EventInspector:
        return ResponsesEventInspector(outcome)

    def prompt(self, body: Mapping[str, Any]) -> Prompt:
        """A Responses API input as chat messages, which is how OpenAI counts it too."""
        messages: list[Any] = []
        if isinstance(body.get("instructions"), str):
            messages.append({"role": "system", "content": body["instructions"]})
        given = body.get("input")
        if isinstance(given, str):
            messages.append({"role": "user", "content": given})
        elif isinstance(given, list):
            messages.extend(item for item in given if isinstance(item, dict))
        return Prompt(chat={"messages": messages})


JSON = JsonAnswers()
CHAT = ChatCompletions()
RESPONSES = Responses()
