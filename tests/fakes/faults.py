"""The faults a test can script on the fake upstream (``FakeOpenAI.fail``, ``drop_connection``, ...).

Each POST takes at most one off the FIFO, after auth and before any reply is taken.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Fail:
    status: int
    body: Mapping[str, Any] | str | bytes | None
    headers: Mapping[str, str]
    delay_s: float = 0.0  # how long the fake thinks before it answers


@dataclass(frozen=True)
class Drop:
    pass


@dataclass(frozen=True)
class SlowFirstByte:
    seconds: float


@dataclass(frozen=True)
class Cut:
    """Send ``after_chunks`` events (or half a JSON body), then close, or hang until the client leaves."""

    after_chunks: int
    hang: bool


@dataclass(frozen=True)
class RawStream:
    """Answer with an SSE stream of exactly these bytes, one write each, ``gap_s`` apart; then, with
    ``endless``, write that again and again until the client leaves (a stream whose event never ends);
    else end the body ``end_delay_s`` after the last piece."""

    pieces: tuple[bytes, ...]
    endless: bytes | None
    gap_s: float = 0.0
    end_delay_s: float = 0.0


@dataclass(frozen=True)
class Stall:
    """Take the request, then answer nothing, not even a status line, until the client leaves."""


@dataclass(frozen=True)
class Flood:
    """Answer 200 with a JSON body of about ``size`` bytes: with a Content-Length (``framing="length"``),
    chunked without one (``"chunked"``), or gzip-compressed (``"gzip"``: a few KB on the wire)."""

    size: int
    framing: str


Fault = Fail | Drop | SlowFirstByte | Cut | RawStream | Stall | Flood
