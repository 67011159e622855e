"""The benchmark's second closed-loop load generator: a Python client as an application would write one.

aiohttp on uvloop, `--connections` keep-alive connections, each with one request in flight at a time;
a stream is read to its `data: [DONE]`. wrk writes a request's head and body in one segment and reads
whatever arrives; an aiohttp client writes them apart, asks for `text/event-stream` and reads a stream
event by event, and the body it sends (bench/upstream/client*.json: a system and a user message, `user`,
`max_tokens`, `temperature`, `stream_options`) carries more for a gateway to parse than wrk's. A proxy's
figure on both clients does not depend on one load generator's habits.

Prints one line, `BENCH_JSON {...}`, with the fields run.py reads from wrk.lua's.

    python bench/pyclient.py --port 8080 --key sk-... --body bench/upstream/client-stream.json \
        --stream --connections 32 --duration 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import aiohttp

DONE = b"data: [DONE]"


class Tally:
    def __init__(self) -> None:
        self.requests = 0
        self.status_errors = 0
        self.bad_streams = 0
        self.read_errors = 0
        self.latencies_us: list[int] = []


async def one_connection(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    stream: bool,
    until: float,
    tally: Tally,
) -> None:
    while (started := time.monotonic()) < until:
        try:
            async with session.post(url, data=body, headers=headers) as response:
                if stream:
                    # Event by event, as an SDK reads a stream; the last one must be [DONE].
                    last = b""
                    async for line in response.content:
                        if line.strip():
                            last = line
                    complete = last.rstrip() == DONE
                else:
                    await response.read()
                    complete = True
        except (TimeoutError, aiohttp.ClientError):
            tally.read_errors += 1
            continue
        if response.status != 200:
            tally.status_errors += 1
        elif not complete:
            tally.bad_streams += 1
        tally.requests += 1
        tally.latencies_us.append(int((time.monotonic() - started) * 1e6))


async def run(args: argparse.Namespace, body: bytes) -> dict[str, int]:
    url = f"http://127.0.0.1:{args.port}/v1/chat/completions"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {args.key}"}
    if args.stream:
        headers["Accept"] = "text/event-stream"
    connector = aiohttp.TCPConnector(limit=args.connections, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=10)
    tally = Tally()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        start = time.monotonic()
        until = start + args.duration
        await asyncio.gather(
            *(
                one_connection(session, url, body, headers, args.stream, until, tally)
                for _ in range(args.connections)
            )
        )
        elapsed = time.monotonic() - start
    latencies = sorted(tally.latencies_us) or [0]
    return {
        "requests": tally.requests,
        "duration_us": int(elapsed * 1e6),
        "connect_errors": 0,
        "read_errors": tally.read_errors,
        "write_errors": 0,
        "status_errors": tally.status_errors,
        "timeouts": 0,
        "bad_streams": tally.bad_streams,
        "p50_us": latencies[len(latencies) // 2],
        "p99_us": latencies[min(len(latencies) - 1, len(latencies) * 99 // 100)],
        "max_us": latencies[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--body", required=True, help="the request body, a file")
    parser.add_argument("--stream", action="store_true", help="read each answer to its data: [DONE]")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds")
    args = parser.parse_args()
    body = Path(args.body).read_bytes()
    try:
        import uvloop
    except ImportError:  # the plain asyncio loop: the client costs more CPU a request
        result = asyncio.run(run(args, body))
    else:
        result = uvloop.run(run(args, body))
    print("BENCH_JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
