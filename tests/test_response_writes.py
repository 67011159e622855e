"""A response's head goes out with its first body bytes, in one send; a head with nothing after it in the
same pass of the event loop goes out at the end of that pass (app/edge/http_head.py, _HeadWithBody)."""

from __future__ import annotations

import asyncio
from typing import Any

from app.edge.http_head import _HeadWithBody

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n"


class _Transport:
    """What a socket would have been asked to send, a list of buffers per send."""

    def __init__(self) -> None:
        self.sends: list[list[bytes]] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.sends.append([data])

    def writelines(self, buffers: Any) -> None:
        self.sends.append(list(buffers))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def test_a_head_and_its_body_go_out_in_one_send() -> None:
    async def respond() -> tuple[list[list[bytes]], list[list[bytes]]]:
        transport = _Transport()
        writes = _HeadWithBody(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        writes.write(HEAD)
        held = list(transport.sends)
        writes.write(b"5\r\nhello\r\n0\r\n\r\n")
        await asyncio.sleep(0)  # the pass ends: nothing more goes out
        return held, transport.sends

    held, sends = asyncio.run(respond())
    assert held == []
    assert sends == [[HEAD, b"5\r\nhello\r\n0\r\n\r\n"]]


def test_a_head_alone_goes_out_when_the_pass_ends_and_later_bytes_follow_it() -> None:
    async def respond() -> tuple[list[list[bytes]], list[list[bytes]]]:
        transport = _Transport()
        writes = _HeadWithBody(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        writes.write(HEAD)
        await asyncio.sleep(0)  # a stream waiting for its upstream: the client sees its head meanwhile
        after_pass = [list(send) for send in transport.sends]
        writes.write(b": keep-alive\n\n")
        return after_pass, transport.sends

    after_pass, sends = asyncio.run(respond())
    assert after_pass == [[HEAD]]
    assert sends == [[HEAD], [b": keep-alive\n\n"]]


def test_closing_sends_a_held_head_first() -> None:
    async def respond() -> _Transport:
        transport = _Transport()
        writes = _HeadWithBody(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        writes.write(HEAD)
        writes.close()
        return transport

    transport = asyncio.run(respond())
    assert transport.sends == [[HEAD]] and transport.closed
