"""What Redis does for each gateway call when limits and budgets live there: commands, Redis CPU time (INFO
commandstats, and the redis-server process's own CPU time) and keys, on a private redis-server, for calls
through the gateway (in this process, in front of the tests' fake upstream, embedded SQLite) by a key
with an RPM, a TPM and a daily budget and a feature with a daily budget: every kind of check at once,
the most a call can cost Redis.

    .venv/bin/python bench/redis_per_call.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import Settings
from app.db.migrate import upgrade
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, ThreadedGateway, free_port, wait_until

# What the gateway sends itself (app/limits): the scripts (admit, settle, charge) and the budget check.
SENT = {"evalsha", "eval", "mget", "get"}


def commandstats(client: redis.Redis) -> dict[str, tuple[int, int]]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for name, v in stats.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found")
    port = free_port()
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        wait_until(lambda: _pings(client))
        with tempfile.TemporaryDirectory() as tmp, FakeOpenAI() as fake:
            config = Path(tmp) / "gateway.yaml"
            config.write_text("features: {bench: {budget_daily_usd: 1000000}}\n")
            upgrade(None, Path(tmp))  # the embedded SQLite database
            settings = Settings(
                master_key=MASTER_KEY,
                openai_api_key=fake.api_key,
                openai_base_url=fake.base_url,
                data_dir=Path(tmp),
                redis_url=f"redis://127.0.0.1:{port}/0",
                config_file=config,
                log_level="warning",
            )
            gateway = ThreadedGateway(settings).start()
            try:
                master = {"authorization": f"Bearer {MASTER_KEY}"}
                spec = {
                    "name": "bench",
                    "rpm_limit": 10**8,
                    "tpm_limit": 10**9,
                    "budget_daily_usd": "1000000",
                }
                key = httpx.post(gateway.url + "/admin/keys", json=spec, headers=master).json()
                headers = {"authorization": f"Bearer {key['secret']}", "x-feature": "bench"}
                body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
                with httpx.Client(base_url=gateway.base_url, headers=headers) as http:
                    http.post("/chat/completions", json=body).raise_for_status()  # scripts loaded
                    time.sleep(0.5)  # the settle of that call, off the request path
                    before = commandstats(client)
                    cpu_before = process_cpu_s(server.pid)
                    for _ in range(args.calls):
                        http.post("/chat/completions", json=body).raise_for_status()
                    wait_until(lambda: _settled(client, before, args.calls), timeout=30)
                    after = commandstats(client)
                    cpu = process_cpu_s(server.pid) - cpu_before
                keys = client.dbsize()
                memory = client.info("memory")["used_memory_dataset"]
            finally:
                gateway.stop()
    finally:
        server.terminate()
        server.wait()
    print(f"{args.calls} calls, each with a key RPM, TPM and daily budget and a feature daily budget:")
    # Redis counts the commands a script runs as well as the script: the time of EVALSHA includes theirs.
    trips = usec_total = 0
    for name, (calls, usec) in sorted(after.items()):
        calls -= before.get(name, (0, 0))[0]
        usec -= before.get(name, (0, 0))[1]
        if not calls or name in ("info", "hello"):
            continue
        sent = name in SENT
        if sent:
            trips += calls
            usec_total += usec
        where = "sent by the gateway" if sent else "inside the scripts"
        print(f"  {name}: {calls / args.calls:.2f} a call ({where}), {usec / calls:.1f} us each in Redis")
    print(f"per call: {trips / args.calls:.2f} round trips, {usec_total / args.calls:.1f} us of Redis CPU")
    per_call = cpu / args.calls * 1e6
    print(f"redis-server process CPU (all of it: sockets, parsing, scripts): {per_call:.0f} us a call")
    print(f"keys held: {keys} ({memory / 1024:.0f} KiB of data) for one key, one feature, one user")


def process_cpu_s(pid: int) -> float:
    """User and system CPU seconds of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def _settled(client: redis.Redis, before: dict[str, tuple[int, int]], calls: int) -> bool:
    # Each call is admitted before it and settled after it: wait for the settles to catch up.
    now = commandstats(client)
    done = sum(c - before.get(n, (0, 0))[0] for n, (c, _) in now.items() if n.startswith("evalsha"))
    return done >= 2 * calls


if __name__ == "__main__":
    main()
