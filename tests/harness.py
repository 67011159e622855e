"""Real servers for the tests: the gateway under uvicorn in a thread, or as a `llm-gateway serve` process."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from app.config import Settings
from app.edge.http_head import head_limited_protocol
from app.main import create_app
from tests.fakes.openai_upstream import FakeOpenAI

MASTER_KEY = "sk-gw-test-master-key"
# The tests' gateways leave the batches they see unpolled within a run unless a test asks otherwise: a
# batch a test created and left unfinished, polled in a later test's window, is a request at the shared
# fake upstream that test did not make.
NO_BATCH_POLLS = {"batch_poll_initial_s": 3600.0, "batch_poll_max_s": 3600.0}


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01) -> Any:
    """Poll `predicate` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


class ThreadedGateway:
    """The gateway app served by uvicorn (uvloop + httptools, as in production) in a background thread;
    or, given `app`, that ASGI app behind the gateway's HTTP server protocol."""

    def __init__(self, settings: Settings, app: Any = None) -> None:
        self.settings = settings
        self.app = create_app(settings) if app is None else app
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=0,
            loop="uvloop",
            http=head_limited_protocol(settings),
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="gateway", daemon=True)
        self.port = 0

    def start(self) -> ThreadedGateway:
        self._thread.start()
        wait_until(lambda: self.server.started or not self._thread.is_alive())
        if not self.server.started:
            raise RuntimeError("gateway failed to start")
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class GatewayProcess:
    """`llm-gateway serve` as a child process, for what only a real process shows (signals, workers,
    memory), in front of `upstream`, writing to `database_url`, keeping its spool and log in data_dir."""

    def __init__(
        self,
        upstream: FakeOpenAI,
        database_url: str,
        data_dir: Path,
        *,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.port = free_port()
        self.env = {
            **os.environ,
            "GATEWAY_MASTER_KEY": MASTER_KEY,
            "OPENAI_API_KEY": upstream.api_key,
            "OPENAI_BASE_URL": upstream.base_url,
            "DATABASE_URL": database_url,
            "GATEWAY_DATA_DIR": str(data_dir),
            "GATEWAY_LOG_LEVEL": "info",
            **{f"GATEWAY_{name.upper()}": str(value) for name, value in NO_BATCH_POLLS.items()},
            **(env or {}),
        }
        self.log_path = data_dir / "gateway.log"
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> GatewayProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "serve", "--port", str(self.port), *self.args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        if wait:
            try:
                wait_until(self.ready, timeout=30)
            except BaseException:
                # A fixture whose start fails never reaches its teardown: the process is stopped here,
                # or a --workers server left behind keeps replacing its workers for as long as it lives.
                self.stop(timeout=10)
                raise
        return self

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {self.proc.returncode}: {self.log_path.read_text()}")
        try:
            return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def _die_with_parent() -> None:
    """In the gateway's child process: SIGTERM when the test run that started it dies (killed, or
    interrupted past its teardowns), so no server outlives its tests."""
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def refused_start(env: dict[str, str]) -> str:
    """Start `llm-gateway serve` with this environment (GATEWAY_* and OPENAI_* of the test run left out),
    expect it to refuse with exit status 2, and return the one line it printed."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OPENAI_"))}
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(free_port())],
        env={**base, "GATEWAY_MASTER_KEY": MASTER_KEY, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]
