"""One huge SSE event (20 MB by default) through the gateway, next to a direct read of the same upstream in
the same run, and how long the gateway's /healthz takes meanwhile.

    .venv/bin/python bench/big_event.py [--mb 20] [--runs 5]

The upstream is the tests' fake OpenAI in a process of its own, answering each chat completion with a
stream whose second chunk carries that many bytes of text, written 16 KiB at a time as an upstream behind
TLS delivers it (its records); the gateway is `llm-gateway serve` (embedded
SQLite, metering on) on CPU 0, the upstream and this client on the others, as in `make bench`. Each run
reads the stream straight from the upstream, then through the gateway while a second thread asks
/healthz back to back. The relay used to search its whole buffer again on every read: 9-15 s for 20 MB
against 0.16 s direct, with /healthz answered after up to 9 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvloop
from harness import (
    GATEWAY_BIN,
    GATEWAY_PY,
    LOAD_CPUS,
    PROXY_CPUS,
    ROOT,
    UPSTREAM_KEY,
    Proc,
    free_port,
    stop_all,
)

MASTER_KEY = "sk-bench-master-key-0001"
REQUEST = {
    "model": "gpt-4o",
    "messages": [{"role": "user", "content": "Say a lot."}],
    "stream": True,
    "stream_options": {"include_usage": True},
}


def serve_upstream(port: int, size: int, answers: int) -> None:
    """The fake upstream, scripted with `answers` streams that each carry one event of ~`size` bytes."""
    sys.path.insert(0, str(ROOT))
    from tests.fakes.openai_upstream import FakeOpenAI

    fake = FakeOpenAI(port=port, api_key=UPSTREAM_KEY, record_requests=False, write_bytes=16 * 1024)
    text = ("a few words of text, " * (size // 21 + 1))[:size]
    for _ in range(answers):
        fake.reply(chunks=["Start:", text], usage={"prompt_tokens": 9, "completion_tokens": size // 4})
    uvloop.run(fake.serve(on_ready=lambda: print("ready", flush=True)))


def read_stream(url: str, key: str) -> tuple[float, int]:
    """Seconds to read the whole stream, and its size."""
    started = time.perf_counter()
    with httpx.stream(
        "POST",
        url + "/chat/completions",
        json=REQUEST,
        headers={"authorization": f"Bearer {key}"},
        timeout=300,
    ) as response:
        response.raise_for_status()
        size = len(response.read())
    return time.perf_counter() - started, size


def through_gateway(url: str) -> tuple[float, int, list[float]]:
    """The gateway's time for the stream, its size, and /healthz's latencies while it relayed."""
    result: list[tuple[float, int]] = []
    reader = threading.Thread(target=lambda: result.append(read_stream(url + "/v1", MASTER_KEY)))
    latencies: list[float] = []
    with httpx.Client(base_url=url, timeout=300) as probe:
        reader.start()
        while reader.is_alive():
            started = time.perf_counter()
            probe.get("/healthz").raise_for_status()
            latencies.append(time.perf_counter() - started)
    reader.join()
    return *result[0], latencies


def wait_healthy(url: str, proc: Proc, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited; see {proc.log_path}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} not ready after {timeout_s}s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=20, help="the event's size in MB (10^6 bytes)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--upstream-port", type=int, help=argparse.SUPPRESS)  # the upstream's own process
    args = parser.parse_args()
    size = int(args.mb * 1_000_000)
    answers = 2 * (args.runs + 1)
    if args.upstream_port:
        serve_upstream(args.upstream_port, size, answers)
        return
    with tempfile.TemporaryDirectory() as tmp:
        logdir = Path(tmp)
        upstream_port, gateway_port = free_port(), free_port()
        env = {
            "GATEWAY_MASTER_KEY": MASTER_KEY,
            "OPENAI_API_KEY": UPSTREAM_KEY,
            "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1",
            "DATABASE_URL": "",
            "GATEWAY_DATA_DIR": tmp,
            "GATEWAY_LOG_LEVEL": "warning",
        }
        try:
            upstream_cmd = [str(GATEWAY_PY), __file__, "--mb", str(args.mb), "--runs", str(args.runs)]
            upstream = Proc(
                "upstream",
                [*upstream_cmd, "--upstream-port", str(upstream_port)],
                cpus=LOAD_CPUS,
                env={},
                logdir=logdir,
            )
            subprocess.run(
                [str(GATEWAY_BIN), "migrate"],
                check=True,
                env={**os.environ, **env},
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
            )
            gateway = Proc(
                "gateway",
                [str(GATEWAY_BIN), "serve", "--port", str(gateway_port)],
                cpus=PROXY_CPUS,
                env=env,
                logdir=logdir,
            )
            upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
            gateway_url = f"http://127.0.0.1:{gateway_port}"
            wait_healthy(upstream_url + "/models", upstream)
            wait_healthy(gateway_url + "/healthz", gateway)
            # Warm-up: the first call pays for imports, connections and the tokenizer's tables.
            read_stream(upstream_url, UPSTREAM_KEY)
            through_gateway(gateway_url)
            rows = []
            for run in range(args.runs):
                direct, direct_size = read_stream(upstream_url, UPSTREAM_KEY)
                relayed, relayed_size, latencies = through_gateway(gateway_url)
                rows.append((direct, relayed, max(latencies)))
                print(
                    f"run {run + 1}: direct {direct:6.3f} s ({direct_size / 1e6:.1f} MB), gateway "
                    f"{relayed:6.3f} s ({relayed_size / 1e6:.1f} MB) = {relayed / direct:4.2f}x direct; "
                    f"/healthz max {max(latencies) * 1000:6.1f} ms, median "
                    f"{statistics.median(latencies) * 1000:5.1f} ms over {len(latencies)} probes",
                    flush=True,
                )
            direct, relayed, worst = (statistics.median(column) for column in zip(*rows, strict=True))
            print(
                f"median of {args.runs}: direct {direct:.3f} s, gateway {relayed:.3f} s "
                f"({relayed / direct:.2f}x); /healthz worst {worst * 1000:.1f} ms"
            )
        finally:
            stop_all()


if __name__ == "__main__":
    main()
