"""The benchmark's plumbing: processes it starts (and stops), tools it installs, the bench database, and
the two upstreams (nginx canned answers, the tests' fake shaped like a model)."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
GATEWAY_PY = ROOT / ".venv" / "bin" / "python"
GATEWAY_BIN = ROOT / ".venv" / "bin" / "llm-gateway"
LITELLM_VENV = BENCH / ".litellm-venv"
# 1.107.0 was a compromised release (pulled from PyPI); the LiteLLM figures compared against are for 1.108.
LITELLM_SPEC = "litellm[proxy]>=1.108,<1.109"
TOOLS_VENV = BENCH / ".tools-venv"
BUILD = BENCH / ".build"


def cpu_sets(count: int) -> tuple[str, str, str]:
    """taskset lists (comma-separated CPUs) for one proxy worker, two workers, and the load: the proxies
    on the first CPUs; wrk, loadgen, the upstreams and the bench database's Postgres backends on the
    rest. With 3 or more CPUs two workers have two cores to themselves; with 2 the load shares CPU 1
    with the second worker."""
    return "0", "0,1", ",".join(str(cpu) for cpu in range(2, count)) or "1"


PROXY_CPUS, WORKERS2_CPUS, LOAD_CPUS = cpu_sets(os.cpu_count() or 1)
UPSTREAM_KEY = "sk-upstream-test"
# A name of its own (BENCH_DB) where several runs share one Postgres server.
BENCH_DB = os.environ.get("BENCH_DB", "llm_gateway_bench")
PG_ADMIN_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
# Shaped like a model: 20 ms to the first token, then 50 more 100 ms apart, so a stream lasts ~5 s and
# 200 streams/s keep 1,000 open at once (10,000 events/s to relay; the Python floor pays ~40 µs an event).
FAKE_FIRST_TOKEN_MS = 20
FAKE_INTER_TOKEN_MS = 100
FAKE_PIECES = 50
FAKE_STREAM_S = (FAKE_FIRST_TOKEN_MS + FAKE_INTER_TOKEN_MS * FAKE_PIECES) / 1000

JSON_BODY = BENCH / "upstream" / "request.json"
STREAM_BODY = BENCH / "upstream" / "request-stream.json"
# bench/pyclient.py's bodies: a system and a user message, `user`, `max_tokens`, `temperature`, and for a
# stream `stream_options`, as an application sends them.
CLIENT_BODY = BENCH / "upstream" / "client.json"
CLIENT_STREAM_BODY = BENCH / "upstream" / "client-stream.json"


def request_body(*, stream: bool, client: bool = False) -> Path:
    """The request a load sends: wrk's and loadgen's body, or (`client`) the Python client's."""
    if client:
        return CLIENT_STREAM_BODY if stream else CLIENT_BODY
    return STREAM_BODY if stream else JSON_BODY


# A gateway's log holds an access line a request, over a gigabyte in a full run: its tail is kept.
LOG_KEPT_BYTES = 1 << 20
# Start-up probes: one token, so a probe through the shaped fake takes 20 ms, not a whole 5 s answer.
READY_BODY = BENCH / "upstream" / "request-ready.json"

_started: list[Proc] = []
_t0 = time.monotonic()


def log(message: str) -> None:
    print(f"[bench {time.monotonic() - _t0:6.1f}s] {message}", file=sys.stderr, flush=True)


def raise_nofile() -> None:
    """preexec_fn: 1,000 streams through a proxy take 2,000+ descriptors."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Proc:
    """A process group this run started, pinned with taskset; stop() ends that group and no other."""

    def __init__(self, name: str, cmd: list[str], *, cpus: str, env: dict[str, str], logdir: Path) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            ["taskset", "-c", cpus, *cmd],
            env={**os.environ, **env},
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=raise_nofile,
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
                    todo += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        return pids

    def peak_rss_mb(self) -> float:
        """The sum over the process tree of each process's high-water RSS (VmHWM)."""
        total_kb = 0
        for pid in self.tree():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total_kb += int(line.split()[1])
        return total_kb / 1024

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process tree so far."""
        return sum(pid_cpu_seconds(pid) for pid in self.tree())

    def stop(self, grace_s: float = 15.0) -> None:
        if self in _started:
            _started.remove(self)
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: still running {grace_s:.0f}s after SIGTERM, killing it")
        # Whatever is left of the group, e.g. a worker that outlived its parent.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        self._log.close()
        self._trim_log()

    def _trim_log(self) -> None:
        size = self.log_path.stat().st_size
        if size <= 2 * LOG_KEPT_BYTES:
            return
        with self.log_path.open("rb") as f:
            f.seek(size - LOG_KEPT_BYTES)
            tail = f.read().split(b"\n", 1)[-1]
        self.log_path.write_bytes(f"[bench: {size - len(tail):,} bytes cut]\n".encode() + tail)


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
    """Until a real chat completion through `port` answers 200."""
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
        raise SystemExit(f"bench: needs {' '.join(packages)}: sudo apt-get install -y {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not _apt_updated:
        log("apt-get update")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
        _apt_updated = True
    log(f"apt-get install {' '.join(packages)}")
    cmd = ["apt-get", "install", "-y", "-qq", *packages]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)


def which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    return next((str(p) for d in ("/usr/sbin", "/sbin") if (p := Path(d) / name).exists()), None)


def ensure_tools() -> dict[str, str]:
    """nginx and wrk from Debian, and bench/.build/loadgen compiled from bench/loadgen.c."""
    missing = [pkg for tool, pkg in (("nginx", "nginx-light"), ("wrk", "wrk")) if not which(tool)]
    if not which("cc"):
        missing += ["gcc", "libc6-dev"]
    if missing:
        apt_install(*missing)
    BUILD.mkdir(exist_ok=True)
    loadgen, source = BUILD / "loadgen", BENCH / "loadgen.c"
    if not loadgen.exists() or loadgen.stat().st_mtime < source.stat().st_mtime:
        log("building bench/.build/loadgen")
        subprocess.run(["cc", "-O2", "-Wall", "-o", str(loadgen), str(source), "-lm"], check=True)
    return {"nginx": str(which("nginx")), "wrk": str(which("wrk")), "loadgen": str(loadgen)}


def base_python() -> str:
    return shutil.which("python3.11") or shutil.which("python3") or sys.executable


def ensure_litellm(timeout_s: float) -> tuple[Path | None, str]:
    """The LiteLLM proxy in bench/.litellm-venv: (its binary, version), or (None, why not)."""
    binary, stamp = LITELLM_VENV / "bin" / "litellm", LITELLM_VENV / ".bench-spec"
    if binary.exists() and stamp.exists() and stamp.read_text() == LITELLM_SPEC:
        return binary, _litellm_version()
    log(f"installing {LITELLM_SPEC} into bench/.litellm-venv (first run only, about a minute)")
    pip = [str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", LITELLM_SPEC]
    try:
        if not (LITELLM_VENV / "bin" / "pip").exists():
            subprocess.run([base_python(), "-m", "venv", str(LITELLM_VENV)], check=True, timeout=120)
        subprocess.run(pip, check=True, timeout=timeout_s, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except subprocess.TimeoutExpired:
        return None, f"pip install {LITELLM_SPEC} took over {timeout_s:.0f}s"
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()[-1:]
        return None, f"pip install {LITELLM_SPEC} failed: {' '.join(tail)[:200]}"
    stamp.write_text(LITELLM_SPEC)
    return binary, _litellm_version()


def _litellm_version() -> str:
    code = "import importlib.metadata as m; print(m.version('litellm'))"
    try:
        out = subprocess.run(
            [str(LITELLM_VENV / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=60
        )
        return out.stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def ensure_py_spy() -> Path:
    binary = TOOLS_VENV / "bin" / "py-spy"
    if not binary.exists():
        log("installing py-spy into bench/.tools-venv")
        subprocess.run([base_python(), "-m", "venv", str(TOOLS_VENV)], check=True)
        subprocess.run([str(TOOLS_VENV / "bin" / "pip"), "install", "-q", "py-spy"], check=True)
    return binary


def cpu_busy_percent(seconds: float = 1.0) -> float:
    """How busy the whole machine is, before this run adds anything."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 100.0 * (1 - (idle1 - idle0) / max(1, total1 - total0))


def machine_cpu_seconds() -> float:
    """User and system CPU seconds of the whole machine since boot; interrupt time (loopback traffic's
    softirq, which this run causes) is left out."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:4]]
    return sum(fields) / os.sysconf("SC_CLK_TCK")


def pid_cpu_seconds(pid: int) -> float:
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def bench_db_backends(database: str = BENCH_DB) -> list[int]:
    """The Postgres backends serving `database`: the metered gateway's connections."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if f" {database} ".encode() in (entry / "cmdline").read_bytes().replace(b"\0", b" "):
                    pids.append(int(entry.name))
    return pids


def bench_db_backends_cpu(database: str = BENCH_DB) -> float:
    """CPU seconds of the backends serving `database` so far."""
    return sum(pid_cpu_seconds(pid) for pid in bench_db_backends(database))


def pin_bench_db_backends(cpus: str) -> None:
    """The bench database's backends onto `cpus` (a taskset list): the database's work is part of the
    load, not the proxy's core. Only these backends: the server and other databases are left alone."""
    allowed = {int(cpu) for cpu in cpus.split(",")}
    for pid in bench_db_backends():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, allowed)


def wait_quiet(max_s: float = 30.0, cores: float = 0.15) -> float:
    """Wait up to max_s for the machine to use less than `cores` CPUs (this run's processes are idle
    between measurements, so what is left is other work). Returns the last reading, in CPUs."""
    deadline = time.monotonic() + max_s
    while True:
        before = machine_cpu_seconds()
        time.sleep(0.5)
        busy = (machine_cpu_seconds() - before) / 0.5
        if busy < cores or time.monotonic() >= deadline:
            return busy


# -- the bench database ----------------------------------------------------------------------------------

_PG_SCRIPT = """
import asyncio, sys, asyncpg
async def main():
    c = await asyncpg.connect(sys.argv[1])
    try:
        sql = sys.argv[2]
        print(await (c.fetchval(sql) if sql.upper().startswith("SELECT") else c.execute(sql)))
    finally:
        await c.close()
asyncio.run(main())
"""


def _pg(sql: str, url: str = PG_ADMIN_URL) -> str:
    # asyncpg from the gateway's venv, so the bench needs no psql.
    out = subprocess.run(
        [str(GATEWAY_PY), "-c", _PG_SCRIPT, url, sql], capture_output=True, text=True, timeout=60
    )
    if out.returncode != 0:
        raise RuntimeError(f"postgres: {out.stderr.strip().splitlines()[-1:]}")
    return out.stdout.strip()


def bench_db_url() -> str:
    return f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{BENCH_DB}"


def create_db() -> None:
    if not BENCH_DB.replace("_", "").isalnum():
        raise SystemExit("BENCH_DB: letters, digits and _ only")
    # Quoted, so that the name keeps its case, as the URL gives it (unquoted, Postgres folds it).
    _pg(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)')
    _pg(f'CREATE DATABASE "{BENCH_DB}"')
    env = {**os.environ, "DATABASE_URL": bench_db_url()}
    subprocess.run([str(GATEWAY_BIN), "migrate"], check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)


def drop_db() -> None:
    with contextlib.suppress(Exception):
        _pg(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)')


def usage_rows() -> int:
    try:
        return int(_pg("SELECT count(*) FROM usage_events", bench_db_url()))
    except (RuntimeError, ValueError):
        return -1


# -- upstreams -------------------------------------------------------------------------------------------


def _nginx_text(path: Path) -> str:
    # Inside a single-quoted nginx string only backslash and quote need escaping; '$' would be a variable.
    text = path.read_text()
    assert "$" not in text, f"{path} must not contain '$'"
    return text.replace("\\", "\\\\").replace("'", "\\'")


def start_nginx(nginx: str, run_dir: Path, logdir: Path) -> tuple[Proc, int, int]:
    """nginx on the load's CPUs: a canned chat.completion on one port, a canned SSE stream on the other."""
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
    cmd = [nginx, "-c", str(conf_path), "-p", str(run_dir)]
    proc = Proc("nginx", cmd, cpus=LOAD_CPUS, env={}, logdir=logdir)
    wait_ready(json_port, UPSTREAM_KEY, JSON_BODY, proc, 10)
    wait_ready(sse_port, UPSTREAM_KEY, STREAM_BODY, proc, 10)
    return proc, json_port, sse_port


def start_fake(logdir: Path) -> tuple[Proc, int]:
    """The tests' fake OpenAI on the load's CPUs, shaped like a model (FAKE_*), without collector pauses."""
    port = free_port()
    cmd = [str(GATEWAY_PY), "-m", "tests.fakes.openai_upstream", "--port", str(port)]
    cmd += [
        "--first-token-delay-ms",
        str(FAKE_FIRST_TOKEN_MS),
        "--inter-token-delay-ms",
        str(FAKE_INTER_TOKEN_MS),
        "--reply-pieces",
        str(FAKE_PIECES),
        "--no-gc",
    ]
    proc = Proc("fake-upstream", cmd, cpus=LOAD_CPUS, env={}, logdir=logdir)
    wait_ready(port, UPSTREAM_KEY, READY_BODY, proc, 20)
    return proc, port
