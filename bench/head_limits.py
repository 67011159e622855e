"""What oversized and slow request heads cost a served gateway: `llm-gateway serve` (one worker, embedded
SQLite, no upstream needed) probed on /healthz every 10 ms while

1. one client sends a 48 MB header: the longest /healthz wait meanwhile (the event loop's stall);
2. eight clients send a 32 MB header each: the process's RSS before and after;
3. 50 clients send a request head one byte a second: how many connections are still open after 15 s.

    .venv/bin/python -m bench.head_limits [--big-mb 48] [--many-mb 32] [--slow 50] [--slow-wait-s 15]

With --wrk SECONDS instead: what the bounds cost a request. The gateway under uvicorn with its own
protocol and with plain httptools, in turn (--rounds times), on CPU 0; wrk on /healthz (the least work a
request does, so the protocol's share of it is largest) at 32 connections on CPU 1. Printed: the best
requests/s of each, and the median CPU time the gateway spent a request.

Figures only; the limits themselves are tested in tests/security/test_headers.py.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.harness import GATEWAY_BIN, free_port, pid_cpu_seconds

_MASTER_KEY = "sk-gw-bench-master-key"


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _healthz_ms(port: int) -> float:
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        while sock.recv(65536):
            pass
    return (time.perf_counter() - started) * 1000


class _Prober:
    """/healthz every 10 ms in a thread; the longest wait is the event loop's longest stall, about."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.worst_ms = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.worst_ms = max(self.worst_ms, _healthz_ms(self.port))
            self._stop.wait(0.01)

    def __enter__(self) -> _Prober:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def _big_header(port: int, size: int) -> str:
    """Send one request whose X-Big header is `size` bytes; the gateway's answer (or how it ended)."""
    head = b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nX-Big: "
    chunk = b"a" * (1024 * 1024)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(head)
            sent = 0
            while sent < size:
                piece = chunk[: min(len(chunk), size - sent)]
                sock.sendall(piece)
                sent += len(piece)
            sock.sendall(b"\r\n\r\n")
            answer = sock.recv(65536)
            return answer.split(b"\r\n", 1)[0].decode("latin-1") or "closed"
    except OSError as exc:
        return f"{type(exc).__name__} after the gateway closed"


def _slow_heads(port: int, count: int, wait_s: float) -> int:
    """Open `count` connections that send a head a byte a second; how many are open after wait_s."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nX-Slow: ")
        socks.append(sock)
    open_ = set(range(count))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        for index in list(open_):
            try:
                socks[index].sendall(b"a")
            except OSError:
                open_.discard(index)
        time.sleep(1)
    still = 0
    for index in open_:
        sock = socks[index]
        sock.setblocking(False)
        try:
            sock.recv(1)  # an answer (408) or the end of the connection: the gateway let it go
        except BlockingIOError:
            still += 1  # nothing to read and not closed: the gateway still holds it
        except OSError:
            pass
    for sock in socks:
        sock.close()
    return still


def _serve(protocol: str, port: int) -> None:
    """The gateway as `serve` runs it, with `protocol`: `limited` (the gateway's) or `httptools`."""
    import uvicorn

    from app.config import load_settings
    from app.edge.http_head import head_limited_protocol

    settings = load_settings()
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        port=port,
        loop="uvloop",
        http=head_limited_protocol(settings) if protocol == "limited" else "httptools",
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
    )


def _wrk(env: dict[str, str], seconds: int, rounds: int) -> None:
    """Requests/s and the gateway's CPU time a request: the second is what a busy shared machine disturbs
    least (a run slowed by a neighbour serves fewer requests in the same CPU time per request)."""
    rates: dict[str, list[float]] = {"httptools": [], "limited": []}
    cpu_us: dict[str, list[float]] = {"httptools": [], "limited": []}
    url = ""
    for _ in range(rounds):
        for protocol in rates:
            port = free_port()
            url = f"http://127.0.0.1:{port}/healthz"
            cmd = ["taskset", "-c", "0", sys.executable, "-m", "bench.head_limits", "--serve", protocol]
            proc = subprocess.Popen(
                [*cmd, "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                _wait_healthy(port, proc)
                cpu = pid_cpu_seconds(proc.pid)
                wrk = ["taskset", "-c", "1", "wrk", "-t1", "-c32", f"-d{seconds}s", url]
                out = subprocess.run(wrk, capture_output=True, text=True, check=True).stdout
                cpu = pid_cpu_seconds(proc.pid) - cpu
                lines = out.splitlines()
                rate = float(next(line for line in lines if "Requests/sec" in line).split()[1])
                served = int(next(line for line in lines if " requests in " in line).split()[0])
                rates[protocol].append(rate)
                cpu_us[protocol].append(cpu / served * 1e6)
                print(f"{protocol}: {rate:,.0f} req/s, {cpu_us[protocol][-1]:.1f} us CPU a request")
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    for protocol in rates:
        print(
            f"{protocol}: best {max(rates[protocol]):,.0f} req/s, "
            f"median {statistics.median(cpu_us[protocol]):.1f} us CPU a request"
        )


def _wait_healthy(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            _healthz_ms(port)
            return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the gateway did not start") from None
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wrk", type=int, metavar="SECONDS")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", choices=["limited", "httptools"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--big-mb", type=int, default=48)
    parser.add_argument("--many-mb", type=int, default=32)
    parser.add_argument("--many", type=int, default=8)
    parser.add_argument("--slow", type=int, default=50)
    parser.add_argument("--slow-wait-s", type=float, default=15.0)
    args = parser.parse_args(argv)
    if args.serve:
        _serve(args.serve, args.port)
        return 0
    with tempfile.TemporaryDirectory() as data_dir:
        port = free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OPENAI_", "DATABASE_"))},
            "GATEWAY_MASTER_KEY": _MASTER_KEY,
            "GATEWAY_DATA_DIR": data_dir,
            "GATEWAY_LOG_LEVEL": "warning",
            "OPENAI_API_KEY": "sk-unused",
        }
        subprocess.run([str(GATEWAY_BIN), "migrate"], env=env, check=True, capture_output=True)
        if args.wrk:
            _wrk(env, args.wrk, args.rounds)
            return 0
        proc = subprocess.Popen(
            [str(GATEWAY_BIN), "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_healthy(port, proc)
            baseline = max(_healthz_ms(port) for _ in range(20))
            print(f"/healthz, idle: worst of 20 {baseline:.1f} ms")
            with _Prober(port) as prober:
                answer = _big_header(port, args.big_mb * 1024 * 1024)
            print(
                f"one {args.big_mb} MB header: {answer!r}; worst /healthz meanwhile {prober.worst_ms:.0f} ms"
            )
            rss_before = _rss_mb(proc.pid)
            threads = [
                threading.Thread(target=_big_header, args=(port, args.many_mb * 1024 * 1024))
                for _ in range(args.many)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            rss_after = _rss_mb(proc.pid)
            print(
                f"{args.many} x {args.many_mb} MB headers: RSS {rss_before:.0f} -> {rss_after:.0f} MB "
                f"(+{rss_after - rss_before:.0f} MB)"
            )
            still = _slow_heads(port, args.slow, args.slow_wait_s)
            print(
                f"{args.slow} heads sent a byte a second: {still} still open after {args.slow_wait_s:.0f} s"
            )
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
