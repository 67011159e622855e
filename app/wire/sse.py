"""Server-sent events as the dialects read them: the data an event carries. Where events end in a stream
is the relay's business (`app/proxy/event_framing.py`), which hands on complete events with `\\n` line
ends."""

from __future__ import annotations


def sse_data(event: bytes) -> bytes | None:
    """The data of one SSE event (its `data:` lines joined), or None for comments and data-less events."""
    # One line: its first line end is the blank line's (find, not count: memchr, for a 20 MB event too).
    if event.startswith(b"data: ") and event.find(b"\n", 6) == len(event) - 2:
        return event[6:-2]
    lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None
