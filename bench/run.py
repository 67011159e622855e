"""`make bench`: the proxies against a near-free upstream, one table, PASS/FAIL per target.

Layout on the 2-core machine: each proxy is one process pinned to CPU 0 (`taskset -c 0`); nginx, the
fake upstream, wrk and the C load generator share CPU 1. `--workers 2` runs are pinned to CPUs 0-1 and
share CPU 1 with the load generator and nginx (there is no third core).

Targets: (a) direct to the upstream, the floor; (b) bench/passthrough.py, the Python floor; (c) LiteLLM
proxy (own venv, no database, one worker); (d) this gateway, metering into a fresh Postgres database;
(e) this gateway, metering off; plus (d) with --workers 2 for the scaling target.

Phases, each target started afresh for each (an upstream has one answer):
  json    nginx canned chat.completion: wrk closed loop at 32 and 256 connections; then the open-loop
          driver at a fixed 200 req/s (latency from the scheduled send time).
  stream  nginx canned SSE stream (with the include_usage chunk): wrk closed loop at 32 connections,
          every body checked to end with [DONE] -> streams/s.
  burst   the tests' fake upstream shaped like a model (20 ms to first token, 5 ms between tokens):
          1,000 concurrent streams at once; TTFB and total from the common start; peak RSS.

Writes bench/results/<time>/ (logs, results.json, table.md) and bench/results/latest.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
GATEWAY_PY = ROOT / ".venv" / "bin" / "python"
GATEWAY_BIN = ROOT / ".venv" / "bin" / "llm-gateway"
LITELLM_VENV = BENCH / ".litellm-venv"
# 1.107.0 was a compromised release (pulled); the reference figures are for 1.108.
LITELLM_SPEC = "litellm[proxy]>=1.108,<1.109"
TOOLS_VENV = BENCH / ".tools-venv"
BUILD = BENCH / ".build"
RESULTS = BENCH / "results"
RECORDER_BENCH = BENCH / "recorder_bench.py"

PROXY_CPUS = "0"
LOAD_CPUS = "1"
UPSTREAM_KEY = "sk-upstream-test"
MASTER_KEY = "sk-bench-master-key-0001"
BENCH_DB = "llm_gateway_bench"
PG_ADMIN_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
OFFERED_RPS = 200.0
STREAMS = 1000
FAKE_FIRST_TOKEN_MS = 20
FAKE_INTER_TOKEN_MS = 5

JSON_BODY = BENCH / "upstream" / "request.json"
STREAM_BODY = BENCH / "upstream" / "request-stream.json"

_started: list[Proc] = []
_t0 = time.monotonic()


def log(message: str) -> None:
    print(f"[bench {time.monotonic() - _t0:6.1f}s] {message}", file=sys.stderr, flush=True)


# -- processes -------------------------------------------------------------------------------------------


def _raise_nofile() -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Proc:
    """A process (group) this run started; stop() ends that group only."""

    def __init__(self, name: str, cmd: list[str], *, cpus: str, env: dict[str, str], logdir: Path) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self._log = self.log_path.open("ab")
        full_env = {**os.environ, **env}
        self.popen = subprocess.Popen(
            ["taskset", "-c", cpus, *cmd],
            env=full_env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_raise_nofile,
        )
        _started.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tree(self) -> list[int]:
        pids, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{pid}/task"):
                    children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
                    todo.extend(int(c) for c in children)
        return pids

    def peak_rss_mb(self) -> float:
        """Sum of each process's high-water RSS (VmHWM) over the process tree."""
        total_kb = 0
        for pid in self.tree():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total_kb += int(line.split()[1])
        return total_kb / 1024

    def stop(self, grace_s: float = 15.0) -> None:
        if self in _started:
            _started.remove(self)
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: no exit {grace_s:.0f}s after SIGTERM, killing")
        # Whatever is left of the group (a worker that outlived its parent).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        self._log.close()


def stop_all() -> None:
    for proc in reversed(list(_started)):
        proc.stop(grace_s=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(port: int, body: bytes, key: str, timeout: float = 5.0) -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(port: int, key: str, body: Path, proc: Proc | None, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited during start-up; see {proc.log_path}")
        try:
            status, answer = post(port, body.read_bytes(), key)
            if status == 200:
                return
            last = f"HTTP {status}: {answer[:200]!r}"
        except OSError as exc:
            last = type(exc).__name__
        time.sleep(0.2)
    raise RuntimeError(f"not ready on port {port} after {timeout_s:.0f}s ({last})")


# -- tools -----------------------------------------------------------------------------------------------

_apt_updated = False


def apt_install(*packages: str) -> None:
    global _apt_updated
    if os.geteuid() != 0:
        raise SystemExit(
            f"bench: needs {' '.join(packages)}; run: sudo apt-get install -y {' '.join(packages)}"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not _apt_updated:
        log("apt-get update")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
        _apt_updated = True
    log(f"apt-get install {' '.join(packages)}")
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", *packages], check=True, env=env, stdout=subprocess.DEVNULL
    )


def which(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/sbin") if (p := Path(d) / name).exists()), None
    )


def ensure_tools() -> dict[str, str]:
    missing = [pkg for tool, pkg in (("nginx", "nginx-light"), ("wrk", "wrk")) if not which(tool)]
    if not which("cc"):
        missing += ["gcc", "libc6-dev"]
    if missing:
        apt_install(*missing)
    BUILD.mkdir(exist_ok=True)
    loadgen = BUILD / "loadgen"
    source = BENCH / "loadgen.c"
    if not loadgen.exists() or loadgen.stat().st_mtime < source.stat().st_mtime:
        log("building bench/.build/loadgen")
        subprocess.run(["cc", "-O2", "-Wall", "-o", str(loadgen), str(source), "-lm"], check=True)
    return {"nginx": str(which("nginx")), "wrk": str(which("wrk")), "loadgen": str(loadgen)}


def venv_python() -> str:
    return shutil.which("python3.11") or shutil.which("python3") or sys.executable


def ensure_litellm(timeout_s: float) -> tuple[Path | None, str]:
    """The LiteLLM proxy in its own venv; (None, why) when it cannot be had."""
    binary = LITELLM_VENV / "bin" / "litellm"
    stamp = LITELLM_VENV / ".bench-spec"
    if binary.exists() and stamp.exists() and stamp.read_text() == LITELLM_SPEC:
        return binary, _litellm_version()
    log(f"installing {LITELLM_SPEC} into bench/.litellm-venv (first run only, ~1 min)")
    try:
        if not (LITELLM_VENV / "bin" / "pip").exists():
            subprocess.run([venv_python(), "-m", "venv", str(LITELLM_VENV)], check=True, timeout=120)
        subprocess.run(
            [str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", LITELLM_SPEC],
            check=True,
            timeout=timeout_s,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
    except subprocess.TimeoutExpired:
        return None, f"pip install {LITELLM_SPEC} took over {timeout_s:.0f}s"
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()[-1:]
        return None, f"pip install {LITELLM_SPEC} failed: {' '.join(tail)[:200]}"
    stamp.write_text(LITELLM_SPEC)
    return binary, _litellm_version()


def _litellm_version() -> str:
    try:
        out = subprocess.run(
            [
                str(LITELLM_VENV / "bin" / "python"),
                "-c",
                "import importlib.metadata as m;print(m.version('litellm'))",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return out.stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def ensure_py_spy() -> Path:
    binary = TOOLS_VENV / "bin" / "py-spy"
    if not binary.exists():
        log("installing py-spy into bench/.tools-venv")
        subprocess.run([venv_python(), "-m", "venv", str(TOOLS_VENV)], check=True)
        subprocess.run([str(TOOLS_VENV / "bin" / "pip"), "install", "-q", "py-spy"], check=True)
    return binary


def cpu_busy_percent(seconds: float = 1.0) -> float:
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 100.0 * (1 - (idle1 - idle0) / max(1, total1 - total0))


# -- database --------------------------------------------------------------------------------------------


def _pg(sql: str, url: str = PG_ADMIN_URL) -> str:
    code = (
        "import asyncio,sys,asyncpg\n"
        "async def main():\n"
        "    c = await asyncpg.connect(sys.argv[1])\n"
        "    try:\n"
        "        r = await c.fetchval(sys.argv[2]) if sys.argv[2].lstrip().upper().startswith('SELECT')"
        " else await c.execute(sys.argv[2])\n"
        "        print(r)\n"
        "    finally:\n"
        "        await c.close()\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run([str(GATEWAY_PY), "-c", code, url, sql], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"postgres: {out.stderr.strip().splitlines()[-1:]}")
    return out.stdout.strip()


def bench_db_url() -> str:
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{BENCH_DB}"


def create_db() -> None:
    _pg(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
    _pg(f"CREATE DATABASE {BENCH_DB}")
    env = {**os.environ, "DATABASE_URL": bench_db_url()}
    subprocess.run([str(GATEWAY_BIN), "migrate"], check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)


def drop_db() -> None:
    with contextlib.suppress(Exception):
        _pg(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")


def usage_rows() -> int:
    try:
        return int(_pg("SELECT count(*) FROM usage_events", bench_db_url()))
    except (RuntimeError, ValueError):
        return -1


# -- upstreams -------------------------------------------------------------------------------------------


def _nginx_text(path: Path) -> str:
    # Inside a single-quoted nginx string: only backslash and quote need escaping; no '$' in the bodies.
    text = path.read_text()
    assert "$" not in text, f"{path} must not contain '$' (nginx variable syntax)"
    return text.replace("\\", "\\\\").replace("'", "\\'")


def start_nginx(nginx: str, run_dir: Path, logdir: Path) -> tuple[Proc, int, int]:
    json_port, sse_port = free_port(), free_port()
    conf = (BENCH / "nginx.conf.template").read_text()
    for name, value in {
        "@RUN@": str(run_dir),
        "@JSON_PORT@": str(json_port),
        "@SSE_PORT@": str(sse_port),
        "@JSON_BODY@": _nginx_text(BENCH / "upstream" / "chat.json"),
        "@SSE_BODY@": _nginx_text(BENCH / "upstream" / "stream.sse"),
    }.items():
        conf = conf.replace(name, value)
    conf_path = run_dir / "nginx.conf"
    conf_path.write_text(conf)
    proc = Proc(
        "nginx", [nginx, "-c", str(conf_path), "-p", str(run_dir)], cpus=LOAD_CPUS, env={}, logdir=logdir
    )
    wait_ready(json_port, UPSTREAM_KEY, JSON_BODY, proc, 10)
    wait_ready(sse_port, UPSTREAM_KEY, STREAM_BODY, proc, 10)
    return proc, json_port, sse_port


def start_fake(logdir: Path) -> tuple[Proc, int]:
    port = free_port()
    cmd = [
        str(GATEWAY_PY),
        "-m",
        "tests.fakes.openai_upstream",
        "--port",
        str(port),
        "--first-token-delay-ms",
        str(FAKE_FIRST_TOKEN_MS),
        "--inter-token-delay-ms",
        str(FAKE_INTER_TOKEN_MS),
    ]
    proc = Proc("fake-upstream", cmd, cpus=LOAD_CPUS, env={}, logdir=logdir)
    wait_ready(port, UPSTREAM_KEY, STREAM_BODY, proc, 20)
    return proc, port


# -- targets ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    key: str
    label: str
    kind: str  # direct | passthrough | litellm | gateway
    metering: bool = False
    workers: int = 1

    @property
    def client_key(self) -> str:
        return UPSTREAM_KEY if self.kind in ("direct", "passthrough") else MASTER_KEY


DIRECT = Target("direct", "(a) direct to upstream", "direct")
FLOOR = Target("passthrough", "(b) bare Python pass-through", "passthrough")
LITELLM = Target("litellm", "(c) LiteLLM proxy", "litellm")
GW_METER = Target("gw", "(d) gateway, metering on", "gateway", metering=True)
GW_NOMETER = Target("gw_nometer", "(e) gateway, metering off", "gateway", metering=False)
GW_W2 = Target("gw_w2", "(d) gateway, metering on, --workers 2", "gateway", metering=True, workers=2)


class Runner:
    def __init__(self, args: argparse.Namespace, tools: dict[str, str], run_dir: Path) -> None:
        self.args = args
        self.tools = tools
        self.run_dir = run_dir
        self.logdir = run_dir / "logs"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []
        self.litellm_bin: Path | None = None

    def r(self, target: Target) -> dict[str, Any]:
        return self.results.setdefault(target.key, {})

    # starting a target in front of an upstream origin ("http://127.0.0.1:PORT")
    def start(self, target: Target, origin: str, upstream_port: int, phase: str) -> tuple[Proc | None, int]:
        if target.kind == "direct":
            return None, upstream_port
        port = free_port()
        name = f"{target.key}-{phase}"
        if target.kind == "passthrough":
            cmd = [str(GATEWAY_PY), str(BENCH / "passthrough.py"), "--port", str(port), "--upstream", origin]
            proc = Proc(name, [*cmd, "--key", UPSTREAM_KEY], cpus=PROXY_CPUS, env={}, logdir=self.logdir)
            timeout = 20.0
        elif target.kind == "litellm":
            assert self.litellm_bin is not None
            config = self.run_dir / f"litellm-{phase}.yaml"
            config.write_text(
                "model_list:\n"
                "  - model_name: gpt-4o-mini\n"
                "    litellm_params:\n"
                "      model: openai/gpt-4o-mini\n"
                f"      api_base: {origin}/v1\n"
                f"      api_key: {UPSTREAM_KEY}\n"
                "general_settings:\n"
                f"  master_key: {MASTER_KEY}\n"
            )
            env = {"LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
            cmd = [str(self.litellm_bin), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
            proc = Proc(name, [*cmd, "--num_workers", "1"], cpus=PROXY_CPUS, env=env, logdir=self.logdir)
            timeout = 90.0
        else:
            env = {
                "GATEWAY_MASTER_KEY": MASTER_KEY,
                "OPENAI_API_KEY": UPSTREAM_KEY,
                "OPENAI_BASE_URL": f"{origin}/v1",
                "DATABASE_URL": bench_db_url(),
                "GATEWAY_METERING": "true" if target.metering else "false",
                "GATEWAY_LOG_LEVEL": "warning",
                "GATEWAY_DATA_DIR": str(self.run_dir / f"data-{target.key}"),
                "GATEWAY_SHUTDOWN_TIMEOUT_S": "10",
            }
            cpus = PROXY_CPUS if target.workers == 1 else "0,1"
            cmd = [str(GATEWAY_BIN), "serve", "--port", str(port), "--workers", str(target.workers)]
            proc = Proc(name, cmd, cpus=cpus, env=env, logdir=self.logdir)
            timeout = 30.0
        body = STREAM_BODY if phase == "stream" else JSON_BODY
        try:
            wait_ready(port, target.client_key, body, proc, timeout)
        except RuntimeError:
            proc.stop()
            raise
        return proc, port

    # -- load generators ---------------------------------------------------------------------------------

    def wrk(self, port: int, key: str, conns: int, seconds: float, stream: bool) -> dict[str, Any]:
        env = {
            **os.environ,
            "BENCH_KEY": key,
            "BENCH_BODY": str(STREAM_BODY if stream else JSON_BODY),
            "BENCH_STREAM": "1" if stream else "0",
        }
        cmd = ["taskset", "-c", LOAD_CPUS, self.tools["wrk"], "-t1", f"-c{conns}", f"-d{seconds:g}s"]
        cmd += [
            "--timeout",
            "10s",
            "-s",
            str(BENCH / "wrk.lua"),
            f"http://127.0.0.1:{port}/v1/chat/completions",
        ]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60)
        line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk printed no result: {out.stdout[-500:]} {out.stderr[-500:]}")
        data: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
        errors = sum(
            data[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
        )
        data["errors"] = errors + data["bad_streams"]
        data["rps"] = data["requests"] / (data["duration_us"] / 1e6)
        return data

    def loadgen(self, mode: str, port: int, key: str, *extra: str, timeout_s: float) -> dict[str, Any]:
        body = STREAM_BODY if mode == "burst" else JSON_BODY
        cmd = ["taskset", "-c", LOAD_CPUS, self.tools["loadgen"], mode, "--port", str(port), "--key", key]
        cmd += ["--body", str(body), *extra]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, preexec_fn=_raise_nofile)
        if out.returncode != 0:
            raise RuntimeError(f"loadgen {mode} failed: {out.stderr.strip()[-300:]}")
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        return result

    # -- phases ------------------------------------------------------------------------------------------

    def _run_target(self, target: Target, phase: str, origin: str, upstream_port: int, work: Any) -> None:
        log(f"{phase}: {target.label}")
        try:
            proc, port = self.start(target, origin, upstream_port, phase)
        except RuntimeError as exc:
            self.notes.append(f"{target.label}, {phase} phase: did not start ({exc})")
            log(f"  did not start: {exc}")
            return
        try:
            work(target, port, proc)
        except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
            self.notes.append(f"{target.label}, {phase} phase: {exc}")
            log(f"  failed: {exc}")
        finally:
            if proc is not None:
                self.r(target)[f"rss_{phase}_mb"] = proc.peak_rss_mb()
                proc.stop()

    def json_phase(self, targets: list[Target], origin: str, upstream_port: int) -> None:
        d = self.args.duration

        def work(target: Target, port: int, proc: Proc | None) -> None:
            res = self.r(target)
            key = target.client_key
            self.wrk(port, key, 32, min(2.0, d), stream=False)  # warm-up, not recorded
            for conns in (32, 256):
                w = self.wrk(port, key, conns, d, stream=False)
                res[f"rps_{conns}"], res[f"errors_{conns}"] = w["rps"], w["errors"]
                log(f"  {conns:>3} conns: {w['rps']:>10,.0f} req/s  errors {w['errors']}")
            if self.args.profile and target is GW_METER and proc is not None:
                self.profile(proc, port, key)
            if target.workers > 1:
                return
            if res["rps_32"] < OFFERED_RPS * 1.2:
                res["latency"] = {"skipped": f"capacity {res['rps_32']:.0f} req/s is below the offered load"}
                log("  latency: skipped, capacity below the offered load")
                return
            lat = self.loadgen(
                "rate",
                port,
                key,
                "--rate",
                f"{OFFERED_RPS:g}",
                "--duration",
                f"{self.args.latency_duration:g}",
                "--warmup",
                "2",
                timeout_s=self.args.latency_duration + 60,
            )
            res["latency"] = lat
            log(
                f"  {OFFERED_RPS:g} req/s open loop: p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, "
                f"failed {lat['failed']}, timer lag p99 {lat['timer_lag_p99_ms']} ms"
            )

        for target in targets:
            self._run_target(target, "json", origin, upstream_port, work)
            if target is GW_METER:
                self.r(target)["usage_rows_after_json"] = usage_rows()

    def stream_phase(self, targets: list[Target], origin: str, upstream_port: int) -> None:
        d = self.args.duration

        def work(target: Target, port: int, proc: Proc | None) -> None:
            self.wrk(port, target.client_key, 32, min(1.0, d), stream=True)
            w = self.wrk(port, target.client_key, 32, d, stream=True)
            self.r(target)["streams_per_s"] = w["rps"]
            self.r(target)["stream_errors"] = w["errors"]
            log(f"   32 conns: {w['rps']:>10,.0f} streams/s  bad or failed {w['errors']}")

        for target in targets:
            self._run_target(target, "stream", origin, upstream_port, work)

    def burst_phase(self, targets: list[Target], origin: str, upstream_port: int) -> None:
        def work(target: Target, port: int, proc: Proc | None) -> None:
            key = target.client_key
            timeout = self.args.burst_timeout
            # Warms the code paths (and the proxy's upstream pool) with a smaller burst first.
            self.loadgen(
                "burst", port, key, "--streams", "100", "--timeout", f"{timeout:g}", timeout_s=timeout + 30
            )
            b = self.loadgen(
                "burst",
                port,
                key,
                "--streams",
                str(STREAMS),
                "--timeout",
                f"{timeout:g}",
                timeout_s=timeout + 60,
            )
            self.r(target)["burst"] = b
            log(
                f"  {STREAMS} streams: complete {b['complete']}, TTFB p50 {b['ttfb_p50_ms']} p99 "
                f"{b['ttfb_p99_ms']} ms, total p99 {b['total_p99_ms']} ms"
            )

        for target in targets:
            self._run_target(target, "burst", origin, upstream_port, work)

    def profile(self, proc: Proc, port: int, key: str) -> None:
        py_spy = ensure_py_spy()
        seconds = max(5.0, self.args.duration)
        out = self.run_dir / "profile-gateway-c32"
        cmd = ["taskset", "-c", LOAD_CPUS, str(py_spy), "record", "--pid", str(proc.pid), "--nonblocking"]
        cmd += ["--rate", "250", "--duration", f"{seconds + 1:.0f}", "--format", "raw", "-o", f"{out}.txt"]
        log(f"  profiling with py-spy for {seconds:.0f}s at 32 connections")
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        w = self.wrk(port, key, 32, seconds, stream=False)
        spy.wait(timeout=60)
        self.r(GW_METER)["profiled_rps_32"] = w["rps"]
        summary = summarize_profile(Path(f"{out}.txt"))
        (self.run_dir / "profile-summary.txt").write_text(summary)
        log(f"  profile: {out}.txt, summary in {self.run_dir / 'profile-summary.txt'}")

    def recorder_bench(self) -> None:
        if not RECORDER_BENCH.exists():
            return
        log("recorder benchmark: bench/recorder_bench.py")
        env = {**os.environ, "DATABASE_URL": bench_db_url(), "BENCH_DATABASE_URL": bench_db_url()}
        cmd = ["taskset", "-c", PROXY_CPUS, str(GATEWAY_PY), str(RECORDER_BENCH)]
        if self.args.quick and "--quick" in _help_text(cmd):
            cmd.append("--quick")
        try:
            out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
        except subprocess.TimeoutExpired:
            self.results["recorder"] = {"line": "did not finish within 240 s", "ok": False}
            return
        (self.logdir / "recorder_bench.log").write_text(out.stdout + out.stderr)
        lines = [x for x in out.stdout.splitlines() if x.strip()]
        line = lines[-1].strip() if lines else f"no output (exit {out.returncode})"
        self.results["recorder"] = {"line": line, "ok": out.returncode == 0, "stdout": out.stdout[-4000:]}


def _help_text(cmd: list[str]) -> str:
    try:
        return subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def summarize_profile(raw: Path, top: int = 25) -> str:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    self_counts: dict[str, int] = {}
    incl_counts: dict[str, int] = {}
    total = 0
    if not raw.exists():
        return "no profile\n"
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        leaf = frames[-1]
        self_counts[leaf] = self_counts.get(leaf, 0) + count
        for frame in set(frames):
            incl_counts[frame] = incl_counts.get(frame, 0) + count
    lines = [f"{total} samples", "", "self %  function (file:line)"]
    for frame, count in sorted(self_counts.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * count / max(1, total):5.1f}  {frame}")
    lines += ["", "inclusive %  function (file:line)"]
    for frame, count in sorted(incl_counts.items(), key=lambda kv: -kv[1])[: top * 2]:
        lines.append(f"{100 * count / max(1, total):5.1f}  {frame}")
    return "\n".join(lines) + "\n"


# -- the table -------------------------------------------------------------------------------------------


def _num(value: Any, fmt: str = ",.0f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value != value:  # NaN
        return "-"
    return format(value, fmt)


def _ratio(a: Any, b: Any) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.2f}x"


def _ms(value: Any) -> str:
    return "timeout" if value is None else f"{value:.2f}"


def render(runner: Runner, meta: dict[str, Any]) -> str:
    R = runner.results
    order = [DIRECT, FLOOR, LITELLM, GW_METER, GW_NOMETER, GW_W2]
    direct_lat = R.get("direct", {}).get("latency", {})
    floor = R.get("passthrough", {})
    lite = R.get("litellm", {})

    out = [f"# Benchmark — {meta['when']}", ""]
    out.append(f"Command: `{meta['command']}`  ")
    out.append(
        f"Machine: {meta['cpus']} CPUs ({meta['cpu_model']}), Python {meta['python']}, {meta['nginx']}, "
        f"{meta['wrk']}, LiteLLM {meta['litellm']}  "
    )
    out.append(
        f"Pinning: proxy `taskset -c {PROXY_CPUS}` (workers=2: `-c 0,1`); nginx, fake upstream, wrk, loadgen "
        f"`taskset -c {LOAD_CPUS}`. Durations: {meta['duration']:g}s per wrk run, "
        f"{meta['latency_duration']:g}s open loop at {OFFERED_RPS:g} req/s. "
        f"Background CPU before the run: {meta['background_busy']:.0f}%."
    )
    out += ["", "## Per target", ""]
    head = (
        "| target | JSON req/s @32 | @256 | xfloor @32 | xLiteLLM @32 | p50 / p99 ms @200 req/s | added p50 / p99 ms "
        "| streams/s @32 | xfloor | xLiteLLM | 1000 streams: complete | TTFB p50 / p99 ms | total p50 / p99 ms "
        "| peak RSS MB (1000 streams) |"
    )
    out += [head, "|" + "---|" * (head.count("|") - 1)]
    for t in order:
        res = R.get(t.key)
        if res is None:
            continue
        lat = res.get("latency", {})
        if "skipped" in lat:
            lat_cell = added_cell = f"n/a ({lat['skipped']})"
        elif lat:
            lat_cell = f"{_ms(lat.get('p50_ms'))} / {_ms(lat.get('p99_ms'))}"
            if t is DIRECT:
                added_cell = "(reference)"
            elif direct_lat and lat.get("p50_ms") is not None and lat.get("p99_ms") is not None:
                added_cell = f"{lat['p50_ms'] - direct_lat['p50_ms']:+.2f} / {lat['p99_ms'] - direct_lat['p99_ms']:+.2f}"
            else:
                added_cell = "-"
        else:
            lat_cell = added_cell = "-"
        b = res.get("burst", {})
        burst_complete = f"{b['complete']}/{b['streams']}" if b else "-"
        ttfb = f"{_ms(b.get('ttfb_p50_ms'))} / {_ms(b.get('ttfb_p99_ms'))}" if b else "-"
        total = f"{_ms(b.get('total_p50_ms'))} / {_ms(b.get('total_p99_ms'))}" if b else "-"
        rss = res.get("rss_burst_mb")
        out.append(
            f"| {t.label} | {_num(res.get('rps_32'))} | {_num(res.get('rps_256'))} "
            f"| {_ratio(res.get('rps_32'), floor.get('rps_32'))} | {_ratio(res.get('rps_32'), lite.get('rps_32'))} "
            f"| {lat_cell} | {added_cell} | {_num(res.get('streams_per_s'))} "
            f"| {_ratio(res.get('streams_per_s'), floor.get('streams_per_s'))} "
            f"| {_ratio(res.get('streams_per_s'), lite.get('streams_per_s'))} | {burst_complete} | {ttfb} | {total} "
            f"| {_num(rss)} |"
        )
    out += ["", "## Targets (checked here, not in tests)", ""]
    out += ["| target | measured | reference (same run) | threshold | result |", "|---|---|---|---|---|"]
    for row in checks(R):
        out.append(f"| {row[0]} | {row[1]} | {row[2]} | {row[3]} | {row[4]} |")
    if "recorder" in R:
        rec = R["recorder"]
        out.append(
            f"| recorder (bench/recorder_bench.py) | {rec['line']} | - | - | {'ran' if rec['ok'] else 'FAILED'} |"
        )
    errors = [
        f"{t.label}: {res.get(k)} {k.replace('_', ' ')}"
        for t in order
        if (res := R.get(t.key))
        for k in ("errors_32", "errors_256", "stream_errors")
        if res.get(k)
    ]
    notes = list(runner.notes) + errors
    gw = R.get("gw", {})
    if "usage_rows_after_json" in gw:
        notes.append(
            f"metering check: {gw['usage_rows_after_json']:,} usage_events rows after the gateway's json phase"
        )
    if "profiled_rps_32" in gw:
        notes.append(
            f"profiled run (py-spy --nonblocking, 250 Hz): {gw['profiled_rps_32']:,.0f} req/s at 32 connections"
        )
    if meta["background_busy"] > 15:
        notes.append(
            f"the machine was {meta['background_busy']:.0f}% busy before the run (other processes): figures are noisy"
        )
    if notes:
        out += ["", "Notes:", *[f"- {n}" for n in notes]]
    return "\n".join(out) + "\n"


def checks(R: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, str, str]]:
    rows: list[tuple[str, str, str, str, str]] = []
    gw, off, floor, direct, w2 = (
        R.get(k, {}) for k in ("gw", "gw_nometer", "passthrough", "direct", "gw_w2")
    )

    def verdict(ok: bool | None) -> str:
        return "-" if ok is None else ("PASS" if ok else "**FAIL**")

    def ratio_row(name: str, a: Any, b: Any, ref_label: str, minimum: float, unit: str) -> None:
        if not a or not b:
            rows.append((name, _num(a), f"{ref_label} {_num(b)}", f">= {minimum:.0%}", verdict(None)))
            return
        rows.append(
            (
                name,
                f"{a:,.0f} {unit} ({a / b:.0%})",
                f"{ref_label} {b:,.0f}",
                f">= {minimum:.0%}",
                verdict(a / b >= minimum),
            )
        )

    ratio_row(
        "JSON throughput, 1 worker, metering on, 32 conns",
        gw.get("rps_32"),
        floor.get("rps_32"),
        "pass-through",
        0.70,
        "req/s",
    )
    ratio_row(
        "JSON throughput, 1 worker, metering on, 256 conns",
        gw.get("rps_256"),
        floor.get("rps_256"),
        "pass-through",
        0.70,
        "req/s",
    )
    ratio_row(
        "streams/s, 1 worker, metering on, 32 conns",
        gw.get("streams_per_s"),
        floor.get("streams_per_s"),
        "pass-through",
        0.70,
        "streams/s",
    )

    lat, dlat = gw.get("latency", {}), direct.get("latency", {})
    for pct, limit in (("p50", 1.0), ("p99", 5.0)):
        a, b = lat.get(f"{pct}_ms"), dlat.get(f"{pct}_ms")
        if lat and dlat and "skipped" not in lat:
            if a is None:
                rows.append(
                    (
                        f"added latency {pct} at {OFFERED_RPS:g} req/s",
                        "timeouts",
                        f"direct {_ms(b)} ms",
                        f"< {limit:g} ms",
                        verdict(False),
                    )
                )
            else:
                added = a - (b or 0)
                rows.append(
                    (
                        f"added latency {pct} at {OFFERED_RPS:g} req/s",
                        f"{added:+.2f} ms ({a:.2f} ms)",
                        f"direct {_ms(b)} ms",
                        f"< {limit:g} ms",
                        verdict(added < limit),
                    )
                )
        else:
            rows.append(
                (f"added latency {pct} at {OFFERED_RPS:g} req/s", "-", "-", f"< {limit:g} ms", verdict(None))
            )

    burst, dburst, fburst = gw.get("burst", {}), direct.get("burst", {}), floor.get("burst", {})
    if burst:
        rows.append(
            (
                f"{STREAMS} concurrent streams, 1 worker: all complete",
                f"{burst['complete']}/{burst['streams']}",
                f"pass-through {fburst.get('complete', '-')}/{fburst.get('streams', '-')}",
                "all",
                verdict(burst["complete"] == burst["streams"]),
            )
        )
        a, b = burst.get("ttfb_p99_ms"), dburst.get("ttfb_p99_ms")
        fb = fburst.get("ttfb_p99_ms")
        floor_over = f", pass-through {fb - b:+.1f} ms" if fb is not None and b is not None else ""
        if a is not None and b is not None:
            rows.append(
                (
                    f"{STREAMS} streams: TTFB overhead p99 ({FAKE_FIRST_TOKEN_MS} ms / {FAKE_INTER_TOKEN_MS} ms upstream)",
                    f"{a - b:+.1f} ms ({a:.1f} ms)",
                    f"direct {b:.1f} ms{floor_over}",
                    "< 10 ms",
                    verdict(a - b < 10),
                )
            )
        else:
            rows.append(
                (
                    f"{STREAMS} streams: TTFB overhead p99",
                    "timeouts",
                    f"direct {_ms(b)}",
                    "< 10 ms",
                    verdict(False),
                )
            )
    rss = gw.get("rss_burst_mb")
    rows.append(
        (
            f"{STREAMS} streams: peak RSS, 1 worker",
            f"{_num(rss)} MB",
            f"pass-through {_num(floor.get('rss_burst_mb'))} MB, LiteLLM {_num(R.get('litellm', {}).get('rss_burst_mb'))} MB",
            "< 250 MB",
            verdict(None if rss is None else rss < 250),
        )
    )
    a, b = gw.get("rps_32"), off.get("rps_32")
    rows.append(
        (
            "metering cost (metering on vs off, 32 conns)",
            "-" if not a or not b else f"{1 - a / b:+.1%} ({a:,.0f} vs {b:,.0f} req/s)",
            f"metering off {_num(b)}",
            "<= 10%",
            verdict(None if not a or not b else 1 - a / b <= 0.10),
        )
    )
    a, b = w2.get("rps_256"), gw.get("rps_256")
    rows.append(
        (
            "--workers 2 scaling, 256 conns (workers on CPUs 0-1, load generator + nginx on CPU 1)",
            "-" if not a or not b else f"{a / b:.2f}x ({a:,.0f} req/s)",
            f"1 worker {_num(b)}",
            ">= 1.7x",
            verdict(None if not a or not b else a / b >= 1.7),
        )
    )
    return rows


# -- main ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short runs, no LiteLLM: for development")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (default 10, quick 3)")
    parser.add_argument("--latency-duration", type=float, help="seconds of open loop (default 10, quick 4)")
    parser.add_argument(
        "--burst-timeout", type=float, help="seconds a stream burst may take (default 30, quick 15)"
    )
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM")
    parser.add_argument("--litellm", action="store_true", help="include LiteLLM even with --quick")
    parser.add_argument("--profile", action="store_true", help="py-spy the metered gateway at 32 connections")
    parser.add_argument(
        "--only", help="comma-separated target keys: direct,passthrough,litellm,gw,gw_nometer,gw_w2"
    )
    parser.add_argument("--phases", default="json,stream,burst", help="comma-separated: json,stream,burst")
    parser.add_argument("--keep-db", action="store_true", help=f"keep the {BENCH_DB} database")
    args = parser.parse_args(argv)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.latency_duration = args.latency_duration or (4.0 if args.quick else 10.0)
    args.burst_timeout = args.burst_timeout or (15.0 if args.quick else 30.0)
    with_litellm = not args.no_litellm and (args.litellm or not args.quick)

    if (os.cpu_count() or 1) < 2:
        raise SystemExit("bench: needs at least 2 CPUs (proxy on CPU 0, load on CPU 1)")
    if not GATEWAY_BIN.exists():
        raise SystemExit("bench: the gateway is not installed in .venv; run `make install` first")

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = RESULTS / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    tools = ensure_tools()
    runner = Runner(args, tools, run_dir)

    targets = [DIRECT, FLOOR, GW_METER, GW_NOMETER, GW_W2]
    litellm_version = "skipped"
    if with_litellm:
        runner.litellm_bin, litellm_version = ensure_litellm(timeout_s=420)
        if runner.litellm_bin is None:
            runner.notes.append(f"LiteLLM column skipped: {litellm_version}")
            litellm_version = "not installed"
        else:
            targets.insert(2, LITELLM)
    if args.only:
        keep = set(args.only.split(","))
        targets = [t for t in targets if t.key in keep]
    phases = set(args.phases.split(","))

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    background = cpu_busy_percent()
    if background > 15:
        log(f"warning: the machine is {background:.0f}% busy before the run; figures will be noisy")
    meta = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "make bench"
        + (f" BENCH_ARGS='{' '.join(argv or sys.argv[1:])}'" if (argv or sys.argv[1:]) else ""),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": sys.version.split()[0],
        "nginx": _version([tools["nginx"], "-v"]),
        "wrk": _version([tools["wrk"], "-v"]).split(" [")[0],
        "litellm": litellm_version,
        "duration": args.duration,
        "latency_duration": args.latency_duration,
        "background_busy": background,
    }
    try:
        if any(t.kind == "gateway" for t in targets):
            create_db()
        nginx, json_port, sse_port = start_nginx(tools["nginx"], run_dir, runner.logdir)
        if "json" in phases:
            runner.json_phase(targets, f"http://127.0.0.1:{json_port}", json_port)
        if "stream" in phases:
            runner.stream_phase(
                [t for t in targets if t.workers == 1], f"http://127.0.0.1:{sse_port}", sse_port
            )
        nginx.stop()
        if "burst" in phases:
            fake, fake_port = start_fake(runner.logdir)
            runner.burst_phase(
                [t for t in targets if t.workers == 1], f"http://127.0.0.1:{fake_port}", fake_port
            )
            fake.stop()
        if any(t.kind == "gateway" for t in targets):
            runner.recorder_bench()
    except KeyboardInterrupt:
        log("interrupted; stopping everything this run started")
        return 130
    finally:
        stop_all()
        if not args.keep_db:
            drop_db()

    table = render(runner, meta)
    (run_dir / "results.json").write_text(
        json.dumps({"meta": meta, "results": runner.results, "notes": runner.notes}, indent=2, default=str)
    )
    (run_dir / "table.md").write_text(table)
    (RESULTS / "latest.md").write_text(table)
    print(table)
    log(f"done in {time.monotonic() - _t0:.0f}s; results in {run_dir}")
    return 0


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "?"


if __name__ == "__main__":
    sys.exit(main())
