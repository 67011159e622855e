"""A response's head as the gateway's HTTP protocol writes it (app/edge/http_head.py, _write_head): the
same bytes, the same connection state and the same refusals as uvicorn's own `send`, whose per-header
regular expressions it replaces with two passes over the whole head."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from app.edge.http_head import _heads_written_here


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _start(
    ours: bool, headers: list[tuple[bytes, bytes]], *, status: int = 200, method: str = "POST"
) -> tuple[Any, ...]:
    """What the gateway's protocol (`ours`) or uvicorn's writes and keeps for a response started with
    `headers`, or what it raised."""
    transport = _Transport()
    cycle = RequestResponseCycle(
        scope={"type": "http", "method": method},  # type: ignore[typeddict-item]
        transport=transport,  # type: ignore[arg-type]
        flow=FlowControl(transport),  # type: ignore[arg-type]
        logger=logging.getLogger("test"),
        access_logger=logging.getLogger("test.access"),
        access_log=False,
        default_headers=[(b"date", b"Sun, 06 Dec 2026 04:00:00 GMT")],
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=True,
        on_response=lambda: None,
    )

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})

    async def serve() -> None:
        if ours:
            await _heads_written_here(app, cycle, cycle.scope, cycle.receive, cycle.send)
        else:
            await app(cycle.scope, cycle.receive, cycle.send)

    try:
        asyncio.run(serve())
    except RuntimeError as exc:
        return ("raised", str(exc), cycle.response_started)
    return (
        b"".join(transport.written),
        cycle.keep_alive,
        cycle.chunked_encoding,
        cycle.expected_content_length,
        cycle.response_started,
    )


HEADS = {
    "stream": [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"cache-control", b"no-cache"),
        (b"X-Request-Id", b"req_0123\tabc"),
        (b"openai-processing-ms", b"\xe9t\xe9"),  # obs-text is allowed in a value
    ],
    "json": [(b"content-type", b"application/json"), (b"content-length", b"17")],
    "chunked": [(b"transfer-encoding", b"Chunked")],
    "close": [(b"connection", b"keep-alive, Close")],
    "none": [],
    "name with a space": [(b"x bad", b"1")],
    "name with a colon": [(b"x:bad", b"1")],
    "name with a newline": [(b"x\nbad", b"1")],
    "name with an underscore": [(b"x_ok", b"1")],
    "name with obs-text": [(b"x-\xe9", b"1")],
    "value with CRLF": [(b"x-model", b"gpt\r\nset-cookie: a=b")],
    "value with LF": [(b"x-model", b"gpt\nx")],
    "value with a NUL": [(b"x-model", b"gpt\x00")],
    "value with DEL": [(b"x-model", b"gpt\x7f")],
    "a good line before a bad one": [(b"a", b"b"), (b"x-model", b"\r")],
}


REFUSED = {
    "name with a space",
    "name with a colon",
    "name with a newline",
    "value with CRLF",
    "value with LF",
    "value with a NUL",
    "value with DEL",
    "a good line before a bad one",
}


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize(("status", "method"), [(200, "POST"), (204, "POST"), (200, "HEAD")])
def test_a_head_is_written_and_refused_as_uvicorn_does(name: str, status: int, method: str) -> None:
    headers = HEADS[name]
    ours = _start(True, headers, status=status, method=method)
    assert ours == _start(False, headers, status=status, method=method)
    assert (ours[0] == "raised") == (name in REFUSED)


def test_the_refusals_name_the_part_at_fault() -> None:
    assert _start(True, HEADS["name with a space"])[1] == "Invalid HTTP header name."
    assert _start(True, HEADS["value with CRLF"])[1] == "Invalid HTTP header value."
