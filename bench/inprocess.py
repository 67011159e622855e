"""The gateway's own cost per call, without the sockets: the ASGI app driven directly, the upstream client
replaced by a canned answer (the same bytes nginx serves in `make bench`), metering on and off.

    .venv/bin/python bench/inprocess.py [--calls 20000] [--concurrency 1] [--phases json,stream,live]
                                        [--client-body] [--access-log] [--profile]

It measures what the throughput runs cannot isolate: microseconds of this process's CPU per call for
everything between uvicorn and aiohttp (middleware, auth, parsing, policy, limits, relay, metering and the
recorder's writes into a fresh Postgres database). Run-to-run spread is about 1 us, where wrk's is several
percent. With --concurrency N, N calls are in flight at once, interleaved on the event loop as they are
in a server under load. --client-body sends bench/pyclient.py's bodies and headers instead of wrk's;
--access-log writes the access log (to /dev/null) as a production gateway does. --profile prints
cProfile's top functions (which inflates every figure ~3x).
It runs on CPU 0, as the proxies do in `make bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import tempfile
import time
from typing import Any

import uvloop
from harness import (
    BENCH,
    CLIENT_BODY,
    CLIENT_STREAM_BODY,
    JSON_BODY,
    STREAM_BODY,
    bench_db_url,
    create_db,
    drop_db,
)
from multidict import CIMultiDict, CIMultiDictProxy

from app.main import create_app
from app.proxy.upstream import UpstreamResponse

MASTER_KEY = "sk-bench-master-key-0001"
_SSE = BENCH / "upstream" / "stream.sse"
# live: the same stream as a model sends it, one event a read (stream: all of it in the first read).
ANSWERS = {"json": BENCH / "upstream" / "chat.json", "stream": _SSE, "live": _SSE}
REQUESTS = {"json": JSON_BODY, "stream": STREAM_BODY, "live": STREAM_BODY}
CLIENT_REQUESTS = {"json": CLIENT_BODY, "stream": CLIENT_STREAM_BODY, "live": CLIENT_STREAM_BODY}


class _RestOfStream:
    """What the relay reads after the first bytes: the rest of the events, one a read, then the end."""

    def __init__(self, events: list[bytes]) -> None:
        self._events = iter(events)

    async def read_chunk(self) -> bytes | None:
        return next(self._events, None)

    async def close(self) -> None:
        pass


async def measure(
    phase: str, metering: bool, calls: int, concurrency: int, profile: bool, client_body: bool
) -> float:
    os.environ["GATEWAY_METERING"] = "true" if metering else "false"
    answer = ANSWERS[phase].read_bytes()
    events = [event + b"\n\n" for event in answer.split(b"\n\n") if event] if phase == "live" else [answer]
    request = (CLIENT_REQUESTS if client_body else REQUESTS)[phase].read_bytes()
    content_type = "application/json" if phase == "json" else "text/event-stream"
    headers = CIMultiDictProxy(CIMultiDict({"Content-Type": content_type, "Server": "nginx"}))
    app = create_app()
    async with app.router.lifespan_context(app):  # type: ignore[attr-defined]

        async def canned(*_: Any, call: Any, **__: Any) -> UpstreamResponse:
            call.outcome.attempts += 1
            if concurrency > 1:
                await asyncio.sleep(0)  # as the real client would: other calls run meanwhile
            if phase == "json":
                return UpstreamResponse(200, headers, answer)
            return UpstreamResponse(200, headers, events[0], _RestOfStream(events[1:]))  # type: ignore[arg-type]

        app.services.upstream.send = canned
        scope_headers = [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"application/json"),
            (b"authorization", f"Bearer {MASTER_KEY}".encode()),
            (b"content-length", str(len(request)).encode()),
        ]
        if client_body and phase != "json":
            scope_headers.append((b"accept", b"text/event-stream"))

        async def one() -> None:
            finished = asyncio.Event()
            pending = [{"type": "http.request", "body": request, "more_body": False}]
            status: list[int] = []

            async def receive() -> dict[str, Any]:
                if pending:
                    return pending.pop()
                await finished.wait()
                return {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    status.append(message["status"])
                elif not message.get("more_body"):
                    finished.set()

            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": "/v1/chat/completions",
                "raw_path": b"/v1/chat/completions",
                "query_string": b"",
                "root_path": "",
                "server": ("127.0.0.1", 8000),
                "client": ("127.0.0.1", 50000),
                "headers": scope_headers,
                "state": {},
            }
            await app(scope, receive, send)
            if status != [200]:
                raise RuntimeError(f"the gateway answered {status}")

        async def worker(n: int) -> None:
            for _ in range(n):
                await one()

        await worker(2000)  # warm-up: caches, the recorder's connections
        profiler = cProfile.Profile() if profile else None
        started = time.process_time()
        if profiler is not None:
            profiler.enable()
        await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
        if profiler is not None:
            profiler.disable()
        cpu = time.process_time() - started
        if profiler is not None:
            pstats.Stats(profiler).sort_stats(os.environ.get("PSORT", "tottime")).print_stats(
                int(os.environ.get("PN", "25"))
            )
    return cpu / (calls // concurrency * concurrency) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--phases", default="json,stream,live", help="live: a stream one event a read")
    parser.add_argument("--client-body", action="store_true", help="bench/pyclient.py's bodies")
    parser.add_argument("--access-log", action="store_true", help="the access log on, to /dev/null")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    os.environ.update(
        {
            "GATEWAY_MASTER_KEY": MASTER_KEY,
            "OPENAI_API_KEY": "sk-upstream-test",
            "DATABASE_URL": bench_db_url(),
            "GATEWAY_LOG_LEVEL": "info" if args.access_log else "warning",
        }
    )
    if args.access_log:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (the process's stderr, as long as it runs)
    # Pinned like the proxies in `make bench` (Postgres then runs on the other core): unpinned, the
    # scheduler's placement of this process and Postgres moves the metered figure by 10 us and more.
    os.sched_setaffinity(0, {0})
    create_db()
    try:
        for phase in args.phases.split(","):
            figures = {}
            for metering in (True, False):
                with tempfile.TemporaryDirectory() as data_dir:
                    os.environ["GATEWAY_DATA_DIR"] = data_dir
                    figures[metering] = uvloop.run(
                        measure(phase, metering, args.calls, args.concurrency, args.profile, args.client_body)
                    )
            on, off = figures[True], figures[False]
            print(
                f"{phase:6s} {args.concurrency:3d} in flight: metering on {on:6.1f} us CPU a call, "
                f"off {off:6.1f} us; metering {on - off:+5.1f} us"
            )
    finally:
        drop_db()


if __name__ == "__main__":
    main()
