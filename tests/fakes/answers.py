"""What an endpoint module of the fake answers, before ``openai_upstream`` applies faults and framing.

An endpoint is ``async (Incoming) -> Answer``; a ``Router`` maps a method and a path template
(``/v1/files/{id}``) to it. The server sends the answer: a ``Body`` in one piece (or half of it, or none,
under a scripted fault), ``Events`` one write per event with the configured token delays, a ``Download``
chunk by chunk. Endpoints never touch the socket or the request log, so they stay small and testable.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes import openai_payloads as p

JSON_TYPE = "application/json"
SSE_TYPE = "text/event-stream; charset=utf-8"


@dataclass(frozen=True)
class Body:
    status: int
    payload: bytes
    usage: dict[str, Any] | None = None  # recorded as RecordedRequest.usage
    content_type: str = JSON_TYPE
    headers: Mapping[str, str] = field(default_factory=dict)
    # Set for generated answers: the body then takes as long as streaming this many pieces would.
    pieces: int | None = None
    record: Mapping[str, Any] = field(default_factory=dict)  # more RecordedRequest fields to fill in


@dataclass(frozen=True)
class Events:
    events: Sequence[bytes]  # framed
    usage: dict[str, Any] | None = None  # recorded once the last event is out
    tail: bytes = b""  # written after the events: chat's "data: [DONE]"
    tokens: int = 0  # input tokens, for x-ratelimit-remaining-tokens
    lead: int = 0  # events sent before the first-token delay (Responses lifecycle events)


@dataclass(frozen=True)
class Download:
    size: int
    chunks: Iterable[bytes]
    content_type: str = "application/octet-stream"


Answer = Body | Events | Download


@dataclass(frozen=True)
class Incoming:
    request: web.Request
    json: Any  # the parsed JSON body; None for multipart uploads, which the endpoint reads itself
    params: Mapping[str, str]  # the path template's fields


Handler = Callable[[Incoming], Awaitable[Answer]]


def json_body(
    value: Any, status: int = 200, *, usage: dict[str, Any] | None = None, pieces: int | None = None
) -> Body:
    return Body(status, p.dump_body(value), usage, pieces=pieces)


def error_body(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
) -> Body:
    return problem_body(status, p.error(message, type_, code, param))


def problem_body(status: int, problem: Mapping[str, Any]) -> Body:
    return Body(status, p.dump_error(problem))


class Router:
    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []

    def add(self, method: str, template: str, handler: Handler) -> None:
        """``{name}`` matches one path segment, ``{name:path}`` the rest of the path."""

        def group(found: re.Match[str]) -> str:
            return f"(?P<{found[1]}>{'.+' if found[2] else '[^/]+'})"

        pattern = re.sub(r"\\\{(\w+)(:path)?\\\}", group, re.escape(template))
        self._routes.append((method, re.compile(pattern), handler))

    def match(self, method: str, path: str) -> tuple[Handler, dict[str, str]] | None:
        for verb, pattern, handler in self._routes:
            if verb == method and (found := pattern.fullmatch(path)) is not None:
                return handler, found.groupdict()
        return None
