"""The protocol between the gateway and an upstream's wire format: the relay moves bytes and the metering
reads a call's record; a dialect is the one place that knows what the bytes mean.

A dialect serves one endpoint: it says whether a request asks for a stream and what body goes upstream
(the gateway may ask for more than the client did, such as the usage of a stream), reads the model, usage
and service tier from a JSON answer or from a stream's events as they pass, classifies an upstream error,
and gives the prompt in the shape the tokenizer counts when the upstream reports no usage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from app.call.record import Usage


class Outcome(Protocol):
    """What a dialect learns of a call from its answer (the call's record is one)."""

    upstream_model: str | None
    usage: Usage | None
    # The service tier the answer says served it (`default`, `flex`, `priority`, `scale`), which prices it.
    service_tier: str | None
    # The generated text, kept so metering can count completion tokens when no usage ever arrives.
    completion_parts: list[str]
    # An answer that is its own object upstream (a background response) is metered under its id, once,
    # with its own creation time.
    usage_key: str | None
    usage_created_at: float | None


class EventInspector(Protocol):
    done: bool

    def relay(self, block: bytes) -> bytes:
        """Learn what metering needs from the complete events of one upstream read (a block ending with
        a blank line); return the bytes to relay. Events after the end of the stream are dropped. A read
        holding a whole stream comes as one block, so an inspector can look at it at once (byte searches)
        rather than event by event."""

    def finish(self) -> None:
        """The stream is over (completed, broken off, or abandoned by the client)."""


class Payload:
    """The request body for each model tried: the client's own bytes whenever nothing had to change."""

    __slots__ = ("body", "client_wants_usage", "modified", "raw")

    def __init__(
        self, raw: bytes, body: dict[str, Any], *, modified: bool = False, client_wants_usage: bool = True
    ) -> None:
        self.raw = raw
        self.body = body
        self.modified = modified
        # Whether the client asked for a stream's usage itself: the gateway may ask the upstream for it on
        # the client's behalf, and then keeps it from the client.
        self.client_wants_usage = client_wants_usage

    def for_model(self, model: str) -> bytes:
        if not self.modified and self.body.get("model") == model:
            return self.raw
        return orjson.dumps({**self.body, "model": model})


@dataclass(frozen=True, slots=True)
class Prompt:
    """A request's prompt as the tokenizer counts it: a chat body (messages, tools), else plain input."""

    chat: Mapping[str, Any] | None = None
    input: str | list[Any] = ""


class Dialect(Protocol):
    """One endpoint's wire format for JSON answers."""

    def streamed(self, body: Mapping[str, Any]) -> bool:
        """Whether the request asks for its answer as a stream of events."""

    def payload(self, raw: bytes, body: dict[str, Any], *, modified: bool, stream: bool) -> Payload:
        """What goes upstream for the request the client sent (`modified`: `body` no longer matches
        `raw`)."""

    def requested_model(self, raw: bytes) -> str | None:
        """The model a request body names, read from its bytes (None: not JSON, or no model)."""

    def read_answer(self, outcome: Outcome, answer: bytes) -> dict[str, Any] | None:
        """Learn the model, usage and service tier from a JSON answer (its text when it reports no usage);
        return the answer parsed, if it is a JSON object."""

    def error_type(self, status: int, body: bytes) -> str:
        """An upstream error answer's type, as the usage row and the access log name it."""

    def prompt(self, body: Mapping[str, Any]) -> Prompt:
        """The request's prompt, for counting its tokens when the upstream reports none."""


class StreamDialect(Dialect, Protocol):
    """A dialect whose answers can be a stream of server-sent events."""

    def inspector(self, outcome: Outcome, payload: Payload | None) -> EventInspector:
        """What reads a streamed answer's events as they pass (made once the upstream answered a stream);
        `payload`: what was sent, None for a stream the gateway only resumes."""
