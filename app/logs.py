"""JSON log lines, each carrying the request id of the request that wrote it; the access log's line, one a
request, written without the logging machinery when nothing but the gateway's own handler would see it."""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
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


def _timestamp(created: float, msecs: float) -> str:
    global _last_second
    second = int(created)
    cached, text = _last_second
    if cached != second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _last_second = (second, text)
    return f"{text}.{int(msecs):03d}Z"


# The last millisecond stamped by the access log, and its stamp: a loaded gateway logs several a millisecond.
_last_milli: tuple[int, str] = (-1, "")


def _stamp_now() -> str:
    """Now, as JsonFormatter stamps a record made now."""
    global _last_milli
    milli = time.time_ns() // 1_000_000
    cached, text = _last_milli
    if cached != milli:
        text = _timestamp(milli // 1000, milli % 1000)
        _last_milli = (milli, text)
    return text


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
        # The loop whose pass will end by writing them (a loop closed meanwhile never does: the next line
        # asks its own loop).
        self._flushing_on: asyncio.AbstractEventLoop | None = None
        # The millisecond's stamp a line's start was made for, and that start.
        self._started: tuple[str, bytes] = ("", b"")
        atexit.register(self.flush)

    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def write(self, fields: dict[str, Any]) -> None:
        """`fields` as `extra`; the request id is the current request's."""
        handler = self._sole_handler()
        if handler is None:
            self.logger.info(self.message, extra=fields)
            return
        # The line's start as JsonFormatter writes it, then `fields` as orjson writes them: one dict
        # serialised, not a second one built of both (a line's 31,700 instructions became 26,800,
        # callgrind).
        head = self._start()
        request_id = request_id_var.get()
        if request_id is not None:
            head += b',"request_id":' + orjson.dumps(request_id)
        rest = orjson.dumps(fields, default=str, option=orjson.OPT_APPEND_NEWLINE)
        # `fields` written as an object of its own: its opening brace gives way to the comma that goes on
        # with this one.
        data = b"".join((head, b"," if fields else b"", rest[1:]))
        if handler.terminator != "\n":
            data = data[:-1] + handler.terminator.encode()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write(handler, data)
            return
        if self._waiting_for is not handler:
            self.flush()
            self._waiting_for = handler
        self._waiting.append(data)
        if self._flushing_on is not loop:
            self._flushing_on = loop
            loop.call_soon(self.flush)

    def _start(self) -> bytes:
        """`{"ts":...,"level":"info","logger":...,"msg":...`, made once a millisecond."""
        stamp = _stamp_now()
        made, start = self._started
        if made != stamp:
            line = {"ts": stamp, "level": "info", "logger": self.name, "msg": self.message}
            start = orjson.dumps(line)[:-1]
            self._started = (stamp, start)
        return start

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
