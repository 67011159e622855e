"""The SSE event framer on its own: wherever the upstream's reads cut a stream, and whichever line ends
it uses, the same events come out, and an event longer than the cap ends the stream at that event."""

from __future__ import annotations

import itertools

import pytest

from app.proxy.event_framing import EventFramer

# LF, CRLF and CR line ends (WHATWG HTML, "Parsing an event stream"), and a CR whose LF comes later.
STREAM = b"data: a\n\ndata: b\r\n\r\n: note\r\rdata: c\ndata: d\r\n\ndata: e\r\r\n"
EVENTS = [b"data: a\n\n", b"data: b\n\n", b": note\n\n", b"data: c\ndata: d\n\n", b"data: e\n\n"]


def _reads(cuts: tuple[int, ...]) -> list[bytes]:
    bounds = [0, *cuts, len(STREAM)]
    return [STREAM[start:end] for start, end in itertools.pairwise(bounds)]


@pytest.mark.parametrize("pieces", [1, 2, 3])
def test_every_cut_of_the_reads_gives_the_same_events(pieces: int) -> None:
    for cuts in itertools.combinations(range(1, len(STREAM)), pieces - 1):
        framer = EventFramer(1024)
        relayed = [framer.feed(read) for read in _reads(cuts)]
        assert b"".join(relayed) == b"".join(EVENTS), cuts
        # Each read gives whole events or none.
        assert all(out.endswith(b"\n\n") for out in relayed if out), cuts
        assert not framer.overflow


def test_a_read_of_whole_events_is_returned_as_it_came() -> None:
    read = b"".join(EVENTS)
    assert EventFramer(1024).feed(read) is read


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_the_events_before_one_past_the_cap_come_out_then_nothing(cut: int) -> None:
    # "data: c\ndata: d\n\n" is the longest (17 bytes).
    framer = EventFramer(16)
    relayed = framer.feed(STREAM[:cut]) + framer.feed(STREAM[cut:]) + framer.feed(b"data: f\n\n")
    assert relayed == b"".join(EVENTS[:3])
    assert framer.overflow


def test_an_event_that_never_ends_is_dropped_at_the_cap() -> None:
    framer = EventFramer(1024)
    assert framer.feed(b"data: " + b"y" * 1000) == b""
    assert not framer.overflow
    assert framer.feed(b"y" * 100) == b""
    assert framer.overflow
