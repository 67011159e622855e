"""Where the events of an SSE stream end, found in linear time and with a bound on what is held.

An upstream's reads cut events anywhere. Searching the whole buffer again on every read costs the square
of an event's size: one 20 MB event took 9-15 s and blocked the event loop for as long. Here each read is
searched once, the bytes of an event still arriving are kept as a list of reads (joined once, when the
event is complete), and an event longer than the cap ends the stream instead of being held without limit.

A large event need not wait for its end to start going out: `take_early` gives what has come of it but its
last read (which holds its end, where a chunk's usage is), and the event is still returned whole once it
is complete, for the inspectors. Store-and-forward made a 20 MB event take 2.5-3x as long through the
gateway as direct.

Line ends are made `\\n` as they arrive: SSE ends a line with CRLF, LF or CR alike (WHATWG HTML,
"Parsing an event stream"), and the inspectors and the clients downstream then only meet `\\n\\n` between
events. A CRLF cut between two reads is one line end, not two.
"""

from __future__ import annotations

_BLANK_LINE = b"\n\n"


class EventFramer:
    """Feed it the upstream's reads; it returns the complete events each one finishes. The usual read,
    whole events and nothing held from before, is searched once and returned as it is (no copy)."""

    __slots__ = ("_cr", "_held", "_held_bytes", "_released", "_taken", "idle", "max_event_bytes", "overflow")

    def __init__(self, max_event_bytes: int) -> None:
        self.max_event_bytes = max_event_bytes
        # Set once an event longer than max_event_bytes came: nothing from it on is returned.
        self.overflow = False
        # The reads of the event still arriving, none with a blank line in it, none empty.
        self._held: list[bytes] = []
        self._held_bytes = 0
        # The last read ended with CR, whose LF may open the next one.
        self._cr = False
        # Bytes of the event still arriving given by take_early, and how many of its reads they were.
        self._released = 0
        self._taken = 0
        # Nothing held, no CR pending, no overflow: a read of whole LF-framed events is all there is.
        self.idle = True

    def feed(self, chunk: bytes) -> bytes:
        """The events this read completes, each ending with a blank line (b"" when none did).

        Bytes are searched with `find`, never with `in`: CPython first tries the operand of `in` as an
        integer (a byte's value), and for a bytes operand that raises and clears a TypeError, ~1,900
        instructions a test (callgrind), more than the search itself."""
        # The usual read of a live stream: whole events, nothing before them. Checked first, since a
        # stream makes one such read an event (a tenth of the relay's cost per read otherwise).
        if (
            self.idle
            and chunk.endswith(_BLANK_LINE)
            and chunk.find(b"\r") == -1
            and len(chunk) <= self.max_event_bytes
        ):
            return chunk
        events = self._feed(chunk)
        self.idle = not (self._held or self._cr or self.overflow)
        return events

    def _feed(self, chunk: bytes) -> bytes:
        if self.overflow:
            return b""
        if self._cr and chunk:
            self._cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if chunk.find(b"\r") != -1:
            self._cr = chunk[-1:] == b"\r"
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if not chunk:
            return b""
        held = self._held
        # A long read without a line end, the usual one in a large event, is not searched further: memchr
        # is over 10x as fast as rfind's search for the pair (and slower than it on a short read).
        at = chunk.rfind(_BLANK_LINE) if len(chunk) < 4096 or chunk.find(b"\n") != -1 else -1
        if at != -1:
            end = at + 2
        elif held and chunk[:1] == b"\n" and held[-1][-1:] == b"\n":
            end = 1  # the blank line straddles the two reads
        else:
            self._hold(chunk)
            return b""
        events = chunk[:end]
        if held:
            held.append(events)
            events = b"".join(held)
            held.clear()
            self._held_bytes = self._released = self._taken = 0
        if end < len(chunk):
            self._hold(chunk[end:])
        if len(events) > self.max_event_bytes:
            return self._fitting(events)
        return events

    def early_bytes(self) -> int:
        """How much take_early would give now."""
        return self._held_bytes - self._released - len(self._held[-1]) if self._held else 0

    def take_early(self) -> bytes:
        """What has come of the event still arriving but its last read, less what was given before. The
        feed that completes the event returns it whole all the same."""
        held = self._held
        if not held:
            return b""
        early = b"".join(held[self._taken : -1])
        self._taken = len(held) - 1
        self._released += len(early)
        return early

    def _hold(self, part: bytes) -> None:
        self._held.append(part)
        self._held_bytes += len(part)
        if self._held_bytes > self.max_event_bytes:
            self._overflowed()

    def _fitting(self, events: bytes) -> bytes:
        """`events` up to the first one longer than the cap; all of them if none is."""
        start = 0
        while (end := events.find(_BLANK_LINE, start)) != -1:
            if end + 2 - start > self.max_event_bytes:
                self._overflowed()
                return events[:start]
            start = end + 2
        return events

    def _overflowed(self) -> None:
        self.overflow = True
        self._held.clear()
        self._held_bytes = self._taken = 0
