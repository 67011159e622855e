"""Helpers shared by the limits tests: real Redis servers and real worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from redis.asyncio import Redis
from redis.exceptions import RedisError

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# Nothing listens on port 1: connections are refused at once.
CLOSED_URL = "redis://127.0.0.1:1/0"
ROOT = Path(__file__).resolve().parents[2]


def unique_prefix(kind: str) -> str:
    """Keys of their own for each test, in a Redis other test runs may share; they expire by themselves."""
    return f"test:{kind}:{uuid.uuid4().hex}:"


async def delete_keys(prefix: str) -> None:
    """For keys that would otherwise outlive the test by hours: budget counters live a whole period."""
    client = Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def run_workers(code: str, *args: str, workers: int = 2, timeout_s: float = 20.0) -> list[str]:
    """Run `code` in `workers` Python processes, release them together once every one has printed
    "ready", and return the last line each printed."""
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            *args,
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(workers)
    ]
    try:
        async with asyncio.timeout(timeout_s):
            for proc in procs:
                assert proc.stdout is not None
                line = await proc.stdout.readline()
                if line.strip() != b"ready":
                    _, err = await proc.communicate()
                    raise AssertionError(f"worker failed to start: {line!r} {err.decode()}")
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write(b"go\n")
            results = [await proc.communicate() for proc in procs]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err.decode()
    return [out.decode().strip().splitlines()[-1] for out, _ in results]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A private redis-server that a test can stop and start again under a client."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: asyncio.subprocess.Process | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            "redis-server",
            *("--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
            stdout=asyncio.subprocess.DEVNULL,
        )
        client = Redis.from_url(self.url)

        async def answers() -> bool:
            with contextlib.suppress(RedisError):
                return bool(await client.ping())
            return False

        try:
            await eventually(answers)
        finally:
            await client.aclose()

    async def stop(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            await self._proc.wait()


@contextlib.asynccontextmanager
async def hung_server() -> AsyncIterator[str]:
    """A Redis URL whose server accepts connections and never answers."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.close()
        await server.wait_closed()


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    """Poll `check` until it holds, or fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.01)


def redis_problem(url: str) -> str | None:
    """Why the test Redis cannot be used, in a few words; None when it can."""

    async def probe() -> None:
        client = Redis.from_url(url, socket_connect_timeout=5)
        try:
            await client.ping()
        finally:
            await client.aclose()

    try:
        asyncio.run(probe())
    except (RedisError, OSError) as exc:
        return f"cannot be reached ({type(exc).__name__})"
    return None
