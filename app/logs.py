"""JSON log lines, each carrying the request id of the request that wrote it; the access log's line, one a
request, written without the logging machinery when nothing but the gateway's own handler would see it."""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import orjson

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

# LogRecord attributes that are not extra fields a caller passed.
_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


# The last second formatted, and its text: every line within a second starts the same.
_last_second: tuple[int, str] = (-1, "")


def _second_text(second: int) -> str:
    global _last_second
    cached, text = _last_second
    if cached != second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _last_second = (second, text)
    return text


def _timestamp(created: float, msecs: float) -> str:
    return f"{_second_text(int(created))}.{int(msecs):03d}Z"


# A timestamp's end for each millisecond, as _timestamp writes it, and the closing quote.
_MILLIS = tuple(f'.{milli:03d}Z"'.encode() for milli in range(1000))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record.created, record.msecs),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class JsonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The gateway's handler: JSON lines on stderr. A class of its own, so the access log can tell that
    a line would reach it and nothing else."""


class AccessLog:
    """The access log's one line a request. Through the logging machinery a line cost ~14 µs of the event
    loop (a LogRecord with a dozen attributes, the record factory, the caller's frame looked up, the
    formatter walking the record's attributes): 5-7% of a streamed call's CPU. Where the gateway's own
    handler is the only one the line would reach, the same line (the fields in the same order as
    JsonFormatter writes them) is built here; anywhere else (a test capturing records, a handler or
    filter an embedding application added) it goes through logging as before.

    The lines built here while the event loop runs go out together when its current pass ends, in one
    write: a write a line was a system call a request, ~3% of a streamed call's CPU. Outside the loop
    (another thread, the CLI) a line goes out at once; lines still waiting at exit are written then."""

    def __init__(self, name: str, message: str) -> None:
        self.logger = logging.getLogger(name)
        self.name = name
        self.message = message
        self._waiting: list[bytes] = []
        self._waiting_for: JsonHandler | None = None
        # The loop whose pass will end by writing them, and the thread that runs it (a loop closed or
        # stopped meanwhile never does: the next line asks for its own loop).
        self._flushing_on: asyncio.AbstractEventLoop | None = None
        self._flushing_thread = 0
        # The second the lines start with, that start, and what follows the timestamp.
        self._second = -1
        self._second_start = b""
        self._rest = b',"level":"info","logger":%b,"msg":%b' % (orjson.dumps(name), orjson.dumps(message))
        atexit.register(self.flush)

    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def write(self, fields: dict[str, Any]) -> None:
        """`fields` as `extra`; the request id is the current request's."""
        loop = self._running_loop()
        # Where the lines go is looked up once a pass of the loop: the pass's lines go out together.
        if loop is not None and self._flushing_on is loop:
            handler = self._waiting_for
        else:
            handler = self._sole_handler()
        if handler is None:
            self.logger.info(self.message, extra=fields)
            return
        # The line's start as JsonFormatter writes it, then `fields` as orjson writes them: one dict
        # serialised, not a second one built of both (with the start made below, a line went from 31,700
        # instructions to 23,000, callgrind, eight lines a pass).
        parts = [*self._start()]
        request_id = request_id_var.get()
        if request_id is not None:
            parts += (b',"request_id":', orjson.dumps(request_id))
        if fields:
            # `fields` written as an object of its own: its opening brace gives way to the comma that goes
            # on with this one.
            parts += (b",", orjson.dumps(fields, default=str, option=orjson.OPT_APPEND_NEWLINE)[1:])
        else:
            parts.append(b"}\n")
        data = b"".join(parts)
        if handler.terminator != "\n":
            data = data[:-1] + handler.terminator.encode()
        if loop is None:
            self._write(handler, data)
            return
        if self._waiting_for is not handler:
            self.flush()
            self._waiting_for = handler
        self._waiting.append(data)
        if self._flushing_on is not loop:
            self._flushing_on, self._flushing_thread = loop, threading.get_ident()
            loop.call_soon(self.flush)

    def _running_loop(self) -> asyncio.AbstractEventLoop | None:
        """This thread's running loop, if any. The loop a flush waits on is taken to be it when this
        thread scheduled that flush and the loop is running (a thread runs one loop at a time), without
        asking asyncio, which makes a system call (getpid) each time: a pass's first line asks, its other
        lines do not."""
        loop = self._flushing_on
        if loop is not None and self._flushing_thread == threading.get_ident() and loop.is_running():
            return loop
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            return None

    def _start(self) -> tuple[bytes, bytes, bytes]:
        """`{"ts":"...`, up to its millisecond, the millisecond's end, and `,"level":"info",...` up to the
        message: the first made once a second, the others once."""
        milli = time.time_ns() // 1_000_000
        second = milli // 1000
        if second != self._second:
            self._second = second
            self._second_start = b'{"ts":"' + _second_text(second).encode()
        return self._second_start, _MILLIS[milli % 1000], self._rest

    def flush(self) -> None:
        """Write the lines waiting for the end of the event loop's pass."""
        self._flushing_on = None
        handler, waiting = self._waiting_for, self._waiting
        if handler is not None and waiting:
            self._waiting = []
            self._write(handler, b"".join(waiting))

    def _write(self, handler: JsonHandler, data: bytes) -> None:
        """The lines as orjson made them, UTF-8, into the stream's own bytes where it has them (a file,
        stderr): not decoded only to be encoded again."""
        handler.acquire()
        try:
            stream = handler.stream
            raw = getattr(stream, "buffer", None)
            if raw is not None and str(getattr(stream, "encoding", "")).lower().replace("-", "") == "utf8":
                stream.flush()  # what went through the text layer goes first
                raw.write(data)
                raw.flush()
            else:
                stream.write(data.decode())
                stream.flush()
        except Exception:
            # Reported the way logging reports a handler that fails.
            record = self.logger.makeRecord(self.name, logging.INFO, "", 0, data.decode(), (), None)
            handler.handleError(record)
        finally:
            handler.release()

    def _sole_handler(self) -> JsonHandler | None:
        """The JsonHandler if it is the only handler the line would reach, with no filter on the way."""
        found: JsonHandler | None = None
        logger: logging.Logger | None = self.logger
        while logger is not None:
            if logger.filters:
                return None
            for handler in logger.handlers:
                if found is not None or type(handler) is not JsonHandler:
                    return None
                if handler.filters or handler.level > logging.INFO:
                    return None
                found = handler
            if not logger.propagate:
                break
            logger = logger.parent
        return found


def _stamp_request_id(factory: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    # Stamped when the record is made, in the request's context; a handler may format it elsewhere.
    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        request_id = request_id_var.get()
        if request_id is not None:
            record.request_id = request_id
        return record

    make.stamps_request_id = True  # type: ignore[attr-defined]
    return make


def configure_logging(level: str) -> None:
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "stamps_request_id", False):
        logging.setLogRecordFactory(_stamp_request_id(factory))
    handler = JsonHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn installs its own handlers when it configures logging; route everything through ours.
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # We write one access line per request ourselves, with attribution; uvicorn's would double it. No
    # handler anywhere on its way, rather than a disabled logger: uvicorn checks hasHandlers() once per
    # connection and otherwise formats its line's arguments for every response (~2% of the event loop).
    access = logging.getLogger("uvicorn.access")
    access.handlers[:] = []
    access.propagate = False
    # python-multipart warns of every malformed form it reads: a client could fill the log with them.
    # The client gets the reason in its 400, and the access line records the call.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
