"""The access log's line written directly (the gateway's own handler the only one it would reach) is the
line the logging machinery writes for the same fields; with any other handler in reach it goes through
logging, so what that handler is given is a record as before. Lines written while the event loop runs
go out together, in one write, when its pass ends."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from app.logs import AccessLog, JsonFormatter, configure_logging, request_id_var

FIELDS: dict[str, Any] = {
    "method": "POST",
    "path": "/v1/chat/completions",
    "status": 200,
    "latency_ms": 1.25,
    "attempts": 1,
    "feature": "café",
    "user": "bench-user-1",
    "model": "gpt-4o",
    "stream": True,
    "client_disconnected": False,
    "error_type": None,
}


Configure = Callable[[str], io.StringIO]


@pytest.fixture
def configure(monkeypatch: pytest.MonkeyPatch) -> Iterator[Configure]:
    """The gateway's logging at a level, onto a fresh stderr: called in the test's body, after pytest has
    put its capturing handlers on the root logger and its own stderr in place. The root logger is
    restored afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    token = request_id_var.set("req-access-1")

    def configured(level: str) -> io.StringIO:
        stream = io.StringIO()
        monkeypatch.setattr(sys, "stderr", stream)
        configure_logging(level)
        return stream

    try:
        yield configured
    finally:
        request_id_var.reset(token)
        root.handlers[:] = handlers
        root.setLevel(level)


def test_the_direct_line_is_the_line_logging_writes(
    configure: Configure, monkeypatch: pytest.MonkeyPatch
) -> None:
    stderr = configure("info")
    access = AccessLog("gateway.access", "request")
    assert access.enabled()
    handled: list[logging.LogRecord] = []
    with monkeypatch.context() as patched:
        patched.setattr(logging.Logger, "handle", lambda _, record: handled.append(record))
        access.write(dict(FIELDS))
    assert handled == []  # written directly, without a record
    written = stderr.getvalue()
    assert written.endswith("\n") and written.count("\n") == 1
    direct = json.loads(written)

    logger = logging.getLogger("gateway.access")
    record = logger.makeRecord(logger.name, logging.INFO, "", 0, "request", (), None, extra=dict(FIELDS))
    through_logging = json.loads(JsonFormatter().format(record))

    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", direct["ts"])
    assert list(direct) == list(through_logging)
    del direct["ts"], through_logging["ts"]
    assert direct == through_logging
    assert direct["request_id"] == "req-access-1"
    assert direct["feature"] == "café"


def test_with_another_handler_in_reach_the_line_goes_through_logging(configure: Configure) -> None:
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    stderr = configure("info")
    collect = Collect()
    logging.getLogger("gateway").addHandler(collect)
    try:
        AccessLog("gateway.access", "request").write(dict(FIELDS))
    finally:
        logging.getLogger("gateway").removeHandler(collect)
    assert len(records) == 1
    record = records[0]
    assert record.name == "gateway.access" and record.getMessage() == "request"
    assert record.status == 200 and record.request_id == "req-access-1"  # type: ignore[attr-defined]
    # The gateway's handler wrote its line all the same, once.
    assert json.loads(stderr.getvalue())["status"] == 200


def test_a_level_above_info_writes_nothing(configure: Configure) -> None:
    configure("warning")
    assert not AccessLog("gateway.access", "request").enabled()


class _Writes(io.StringIO):
    """A stderr that keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_lines_of_one_pass_of_the_loop_go_out_in_one_write(configure: Configure) -> None:
    configure("info")
    (handler,) = logging.getLogger().handlers
    stream = _Writes()
    handler.setStream(stream)  # type: ignore[attr-defined]
    access = AccessLog("gateway.access", "request")

    async def two_requests_then_one() -> tuple[list[str], list[str]]:
        access.write(dict(FIELDS))
        access.write({**FIELDS, "status": 201})
        during = list(stream.writes)
        # The pass ends: the flush the first line scheduled runs before this task resumes.
        await asyncio.sleep(0)
        after = list(stream.writes)
        access.write({**FIELDS, "status": 202})
        return during, after

    during, after = asyncio.run(two_requests_then_one())
    assert during == []
    assert len(after) == 1
    assert [json.loads(line)["status"] for line in after[0].splitlines()] == [200, 201]
    # The last line went out when the loop ran on (asyncio.run's shutdown), or at the latest at exit.
    access.flush()
    assert [json.loads(line)["status"] for line in "".join(stream.writes).splitlines()] == [200, 201, 202]


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_a_line_reaches_a_byte_stream_as_its_text_would(configure: Configure, encoding: str) -> None:
    """Into a UTF-8 stream's bytes directly, after what logging wrote before it; any other encoding
    through the text layer, encoded as that stream encodes text."""
    configure("info")
    (handler,) = logging.getLogger().handlers
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding=encoding, write_through=False)
    handler.setStream(stream)  # type: ignore[attr-defined]
    logging.getLogger("gateway").warning("before")
    AccessLog("gateway.access", "request").write(dict(FIELDS))
    lines = [json.loads(line) for line in raw.getvalue().decode(encoding).splitlines()]
    assert [line["msg"] for line in lines] == ["before", "request"]
    assert lines[1]["feature"] == "café" and lines[1]["request_id"] == "req-access-1"


def test_a_pass_asks_for_its_loop_once_and_a_stale_loop_is_not_trusted(
    configure: Configure, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncio.get_running_loop makes a system call; the lines after a pass's first know the loop from
    the flush they wait for. A loop that stopped with a flush pending is not taken for the next one."""
    configure("info")
    (handler,) = logging.getLogger().handlers
    stream = _Writes()
    handler.setStream(stream)  # type: ignore[attr-defined]
    access = AccessLog("gateway.access", "request")
    asked: list[int] = []
    real = asyncio.get_running_loop

    def counted() -> asyncio.AbstractEventLoop:
        asked.append(1)
        return real()

    monkeypatch.setattr(asyncio, "get_running_loop", counted)

    stale = asyncio.new_event_loop()

    def three_lines_then_stop() -> None:
        for status in (200, 201, 202):
            access.write({**FIELDS, "status": status})
        stale.stop()  # the pass ends the loop's run: the flush it scheduled is left pending

    stale.call_soon(three_lines_then_stop)
    stale.run_forever()
    assert len(asked) == 1
    assert stream.writes == []

    async def one_line_then_a_pass() -> None:
        access.write({**FIELDS, "status": 203})
        await asyncio.sleep(0)

    asyncio.run(one_line_then_a_pass())
    assert len(asked) == 2  # asked again: the stale loop was not running
    written = "".join(stream.writes).splitlines()
    assert [json.loads(line)["status"] for line in written] == [200, 201, 202, 203]
    stale.close()
