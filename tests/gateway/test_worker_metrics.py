"""/metrics of a server with several workers: every scrape, whichever worker answers it, counts the
whole server's requests."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import httpx
import orjson

from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, GatewayProcess, wait_until

CHAT_200 = {"route": "/v1/chat/completions", "status": "200"}


def _scraped(text: str, pattern: str) -> float:
    found = re.search(pattern + r" (\S+)", text)
    return float(found.group(1)) if found else 0.0


def _requests(text: str) -> float:
    return _scraped(text, r'gateway_requests_total\{route="/v1/chat/completions",status="200"\}')


def _tokens(text: str) -> float:
    return _scraped(
        text,
        r'gateway_tokens_total\{feature="workers",kind="prompt",model="gpt-4o-mini",'
        r'upstream_model="gpt-4o-mini"\}',
    )


def _per_worker(directory: Path) -> list[float]:
    """Chat completions each worker has published so far."""
    counts = []
    for path in directory.glob("*.json"):
        families = orjson.loads(path.read_bytes())
        samples = next((f[3] for f in families if f[0] == "gateway_requests"), [])
        counts.append(sum(value for _, labels, value in samples if labels == CHAT_200))
    return counts


def _workers(server: int) -> list[int]:
    """The server's worker processes (multiprocessing's resource tracker is a child of it too)."""
    workers = []
    for child in Path(f"/proc/{server}/task/{server}/children").read_text().split():
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:  # gone meanwhile
            continue
        if b"resource_tracker" not in command:
            workers.append(int(child))
    return workers


def test_every_scrape_counts_every_worker(fake_server: FakeOpenAI, database_url: str, tmp_path: Path) -> None:
    fake_server.reset()
    temp = tmp_path / "tmp"
    temp.mkdir()
    gateway = GatewayProcess(
        fake_server, database_url, tmp_path, env={"TMPDIR": str(temp)}, args=("--workers", "2")
    ).start()
    try:
        (directory,) = temp.glob("llm-gateway-metrics-*")
        sent = prompt_tokens = 0

        def both_workers_served() -> bool:
            nonlocal sent, prompt_tokens
            # A connection of its own each time: the kernel hands connections to either worker.
            response = httpx.post(
                gateway.url + "/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                headers={"authorization": f"Bearer {MASTER_KEY}", "x-feature": "workers"},
            )
            response.raise_for_status()
            sent += 1
            prompt_tokens += response.json()["usage"]["prompt_tokens"]
            counts = _per_worker(directory)
            return len(counts) == 2 and all(counts)

        wait_until(both_workers_served, timeout=20, interval=0.05)

        def all_counted() -> bool:
            text = httpx.get(gateway.url + "/metrics").text
            return _requests(text) == sent and _tokens(text) == prompt_tokens

        # The other worker's figures are at most a second old.
        wait_until(all_counted, timeout=10, interval=0.1)
        # From then on every scrape, whichever worker answers it, has all of them.
        for _ in range(8):
            text = httpx.get(gateway.url + "/metrics").text
            assert (_requests(text), _tokens(text)) == (sent, prompt_tokens)

        # A worker that dies is replaced; what it counted stays counted.
        assert gateway.proc is not None
        before = _workers(gateway.proc.pid)
        os.kill(before[0], signal.SIGKILL)
        wait_until(lambda: len(set(_workers(gateway.proc.pid)) - set(before)) == 1, timeout=30, interval=0.1)
        wait_until(gateway.ready, timeout=30)
        for _ in range(8):
            text = httpx.get(gateway.url + "/metrics").text
            assert (_requests(text), _tokens(text)) == (sent, prompt_tokens)
    finally:
        assert gateway.stop() == 0
    assert not directory.exists(), "serve leaves its metrics directory behind"
