"""`make bench`: the proxies in front of a near-free upstream, one table, PASS/FAIL per target.

Each proxy is one process pinned to CPU 0 (`taskset -c 0`), `--workers 2` to CPUs 0-1; nginx, the fake
upstream, wrk, the C load generator and the bench database's Postgres backends run on the other CPUs
(harness.cpu_sets). On a 2-core machine that is CPU 1, which the second worker then shares with them.

Targets: (a) direct to the upstream, the floor; (b) bench/passthrough.py, the Python floor; (c) the
LiteLLM proxy (own venv, no database, one worker); (d) this gateway metering into a fresh Postgres
database; (e) this gateway with metering off; and (d) with --workers 2 for the scaling target.

Phases; every proxy is started afresh for each, since an upstream has one canned answer:
  json    nginx's canned chat.completion: wrk, closed loop, 32 and 256 connections; then loadgen at a
          fixed 200 req/s, open loop, latency from each request's scheduled time. Then (d) and (b) in
          alternated rounds, wrk and the Python client at 32 connections: the share of the pass-through;
          and (d), (e) and (d) with two workers in alternated rounds: the metering cost and the scaling.
  stream  nginx's canned SSE stream (include_usage chunk, [DONE]): wrk, 32 connections, each body
          checked to end with [DONE] -> streams/s. Then (d) and (b) in alternated rounds, as for JSON.
  burst   the tests' fake upstream shaped like a model (20 ms to the first token, then 50 tokens 100 ms
          apart): 200 streams/s open loop, ~1,000 in flight at once (TTFB from the scheduled time), then
          1,000 streams written at once (TTFB and total from the common start); peak RSS.

Writes bench/results/<time>/ (logs, results.json, table.md, profiles) and bench/results/latest.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from harness import (
    BENCH,
    BENCH_DB,
    FAKE_STREAM_S,
    GATEWAY_BIN,
    GATEWAY_PY,
    LOAD_CPUS,
    PG_ADMIN_URL,
    PROXY_CPUS,
    READY_BODY,
    ROOT,
    STREAM_BODY,
    UPSTREAM_KEY,
    WORKERS2_CPUS,
    Proc,
    bench_db_backends_cpu,
    bench_db_url,
    cpu_busy_percent,
    create_db,
    drop_db,
    ensure_litellm,
    ensure_py_spy,
    ensure_tools,
    free_port,
    log,
    machine_cpu_seconds,
    pin_bench_db_backends,
    raise_nofile,
    request_body,
    start_fake,
    start_nginx,
    stop_all,
    usage_rows,
    wait_quiet,
    wait_ready,
)
from report import ALTERNATED_WITH_FLOOR, OFFERED_RPS, STREAMS, render, summarize_profile

RESULTS = BENCH / "results"
RECORDER_BENCH = BENCH / "recorder_bench.py"
PYCLIENT = BENCH / "pyclient.py"
MASTER_KEY = "sk-bench-master-key-0001"


@dataclass(frozen=True)
class Target:
    key: str
    kind: str  # direct | passthrough | litellm | gateway
    metering: bool = False
    workers: int = 1
    # The gateway's environment beyond the benchmark's own, which it overrides (bench/ab.py's variants).
    env: tuple[tuple[str, str], ...] = ()

    @property
    def client_key(self) -> str:
        return UPSTREAM_KEY if self.kind in ("direct", "passthrough") else MASTER_KEY


DIRECT = Target("direct", "direct")
FLOOR = Target("passthrough", "passthrough")
# The same pass-through relaying with the gateway's own upstream client: a reference, not a target.
FLOOR_RQ = Target("passthrough_rq", "passthrough")
LITELLM = Target("litellm", "litellm")
# Runs each of metering on and off in the alternated comparison (bench/README.md, "metering cost").
AB_ROUNDS = 5
GW = Target("gw", "gateway", metering=True)
GW_NOMETER = Target("gw_nometer", "gateway")
GW_W2 = Target("gw_w2", "gateway", metering=True, workers=2)
# The alternated runs' loads: (name in results.json, load generator, connections). The Python client's
# run compares metering on and off only: the scaling is judged at 256 connections.
AB_LOADS = (("32", "wrk", 32), ("256", "wrk", 256), ("py32", "py", 32))

Work = Callable[[Target, int, Proc | None], None]


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
        self.upstream: Proc | None = None
        # Seconds this run may spend in all waiting for other work on the machine to stop.
        self.quiet_budget = 30.0 if args.quick else 120.0

    def r(self, target: Target) -> dict[str, Any]:
        return self.results.setdefault(target.key, {})

    def start(
        self,
        target: Target,
        origin: str,
        upstream_port: int,
        phase: str,
        *,
        under: Sequence[str] = (),
        ready_s: float | None = None,
    ) -> tuple[Proc | None, int]:
        """The target in front of `origin` (http://127.0.0.1:PORT), answering a real completion; `under`
        a command it runs under (bench/instructions.py's valgrind), `ready_s` how long it may take to
        start."""
        if target.kind == "direct":
            return None, upstream_port
        port, name, env = free_port(), f"{target.key}-{phase}", {}
        cpus, default_ready_s = PROXY_CPUS, 30.0
        if target.kind == "passthrough":
            cmd = [str(GATEWAY_PY), str(BENCH / "passthrough.py"), "--port", str(port), "--upstream", origin]
            cmd += ["--key", UPSTREAM_KEY]
            if target is FLOOR_RQ:
                cmd += ["--client", "pyreqwest"]
        elif target.kind == "litellm":
            assert self.litellm_bin is not None
            config = self.run_dir / f"litellm-{phase}.yaml"
            config.write_text(
                "model_list:\n  - model_name: gpt-4o-mini\n    litellm_params:\n"
                f"      model: openai/gpt-4o-mini\n      api_base: {origin}/v1\n"
                f"      api_key: {UPSTREAM_KEY}\ngeneral_settings:\n  master_key: {MASTER_KEY}\n"
            )
            env = {"LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
            cmd = [str(self.litellm_bin), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
            cmd += ["--num_workers", "1"]
            default_ready_s = 120.0
        else:
            env = {
                "GATEWAY_MASTER_KEY": MASTER_KEY,
                "OPENAI_API_KEY": UPSTREAM_KEY,
                "OPENAI_BASE_URL": f"{origin}/v1",
                "DATABASE_URL": bench_db_url(),
                "GATEWAY_METERING": "true" if target.metering else "false",
                # The production default: one JSON access-log line a request, written to the log file.
                "GATEWAY_LOG_LEVEL": "info",
                "GATEWAY_DATA_DIR": str(self.run_dir / f"data-{target.key}"),
                "GATEWAY_SHUTDOWN_TIMEOUT_S": "10",
                **dict(target.env),
            }
            cmd = [str(GATEWAY_BIN), "serve", "--port", str(port), "--workers", str(target.workers)]
            cpus = PROXY_CPUS if target.workers == 1 else WORKERS2_CPUS
        proc = Proc(name, [*under, *cmd], cpus=cpus, env=env, logdir=self.logdir)
        try:
            wait_ready(
                port,
                target.client_key,
                STREAM_BODY if phase == "stream" else READY_BODY,
                proc,
                ready_s if ready_s is not None else default_ready_s,
            )
        except RuntimeError:
            proc.stop()
            raise
        return proc, port

    # -- load generators ---------------------------------------------------------------------------------

    def wrk(self, port: int, key: str, conns: int, seconds: float, stream: bool) -> dict[str, Any]:
        body = request_body(stream=stream)
        env = {
            **os.environ,
            "BENCH_KEY": key,
            "BENCH_BODY": str(body),
            "BENCH_STREAM": "1" if stream else "0",
        }
        cmd = [
            "taskset",
            "-c",
            LOAD_CPUS,
            self.tools["wrk"],
            "-t1",
            f"-c{conns}",
            f"-d{max(1, round(seconds))}s",
        ]  # wrk takes whole seconds
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
            raise RuntimeError(f"wrk printed no result: {out.stdout[-300:]} {out.stderr[-300:]}")
        data: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
        kinds = ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts", "bad_streams")
        data["errors"] = sum(data[k] for k in kinds)
        data["rps"] = data["requests"] / (data["duration_us"] / 1e6)
        return data

    def pyclient(self, port: int, key: str, conns: int, seconds: float, stream: bool) -> dict[str, Any]:
        """bench/pyclient.py, the aiohttp client, with its own body and headers; wrk's result fields."""
        body = request_body(stream=stream, client=True)
        cmd = ["taskset", "-c", LOAD_CPUS, str(GATEWAY_PY), str(PYCLIENT), "--port", str(port), "--key", key]
        cmd += ["--body", str(body), "--connections", str(conns), "--duration", f"{seconds:g}"]
        if stream:
            cmd.append("--stream")
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
        line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
        if line is None:
            raise RuntimeError(f"pyclient printed no result: {out.stdout[-300:]} {out.stderr[-300:]}")
        data: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
        kinds = ("read_errors", "status_errors", "bad_streams")
        data["errors"] = sum(data[k] for k in kinds)
        data["rps"] = data["requests"] / (data["duration_us"] / 1e6)
        return data

    def client(self, name: str) -> Callable[[int, str, int, float, bool], dict[str, Any]]:
        """A closed-loop load generator by name: `wrk` or `py` (bench/pyclient.py)."""
        return self.wrk if name == "wrk" else self.pyclient

    def loadgen(
        self, mode: str, port: int, key: str, *extra: str, stream: bool, timeout_s: float
    ) -> dict[str, Any]:
        body = request_body(stream=stream)
        cmd = ["taskset", "-c", LOAD_CPUS, self.tools["loadgen"], mode, "--port", str(port), "--key", key]
        cmd += ["--body", str(body), *extra]
        if stream and mode == "rate":
            cmd += ["--expect-done", "1"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, preexec_fn=raise_nofile)
        if out.returncode != 0:
            raise RuntimeError(f"loadgen {mode} failed: {out.stderr.strip()[-300:]}")
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        return result

    def measured(
        self, label: str, proc: Proc | None, run: Callable[[], dict[str, Any]], note: bool = True
    ) -> dict[str, Any]:
        """run() once the machine is quiet, recording how much CPU other processes took meanwhile (the
        machine may be shared; a figure taken while something else ran is flagged in the notes)."""
        started = time.monotonic()
        busy = wait_quiet(max_s=min(30.0, self.quiet_budget))
        self.quiet_budget = max(0.0, self.quiet_budget - (time.monotonic() - started))
        if busy >= 0.15:
            log(f"  the machine is busy with other work ({busy:.2f} CPUs); measuring anyway")
        # Backends the gateway opened since the last measurement, too.
        pin_bench_db_backends(LOAD_CPUS)

        def cpu() -> tuple[float, float, float, float]:
            """The proxy's, the upstream's, the load generator's (this run's waited-for children) and
            the bench database's CPU seconds so far."""
            return (
                proc.cpu_seconds() if proc is not None else 0.0,
                self.upstream.cpu_seconds() if self.upstream is not None else 0.0,
                _children_cpu(),
                bench_db_backends_cpu(),
            )

        cpu0, machine0, t0 = cpu(), machine_cpu_seconds(), time.monotonic()
        result = run()
        elapsed = time.monotonic() - t0
        proxy, upstream, loadgen, db = (after - before for before, after in zip(cpu0, cpu(), strict=True))
        result["other_cpus"] = max(
            0.0, (machine_cpu_seconds() - machine0 - proxy - upstream - loadgen - db) / elapsed
        )
        # Where a request's CPU went: the proxy's own process, Postgres writing its usage events, and the
        # load on the machine (the upstream and the load generator).
        result["proxy_cpu_s"], result["db_cpu_s"], result["load_cpu_s"] = proxy, db, upstream + loadgen
        if note:
            self.flag_interference(label, result)
        return result

    def flag_interference(self, label: str, result: dict[str, Any]) -> None:
        if result["other_cpus"] > 0.15:
            text = f"{label}: other processes used {result['other_cpus']:.2f} CPUs during the measurement"
            self.notes.append(text)
            log(f"  {text}")

    def throughput(
        self, target: Target, proc: Proc | None, port: int, conns: int, stream: bool, client: str = "wrk"
    ) -> dict[str, Any]:
        """wrk (or the Python client), best of `--repeats` runs (interference only ever slows a run
        down)."""
        seconds = self.args.duration / self.args.repeats
        label = f"{target.key}, {client} {'streams' if stream else 'req'} at {conns} connections"
        load = self.client(client)
        runs = []
        for _ in range(self.args.repeats):
            runs.append(
                self.measured(
                    label, proc, lambda: load(port, target.client_key, conns, seconds, stream), note=False
                )
            )
            self.settle(target, proc, f"{client} at {conns} connections")
        best = max(runs, key=lambda w: float(w["rps"]))
        best["runs_rps"] = [round(w["rps"], 1) for w in runs]
        best["errors"] = sum(w["errors"] for w in runs)
        self.flag_interference(label, best)
        return best

    def open_loop(self, port: int, key: str, *, stream: bool) -> dict[str, Any]:
        seconds, warmup = self.args.latency_duration, 2.0
        extra: tuple[str, ...] = ("--rate", f"{OFFERED_RPS:g}")
        if stream:
            # Measured once the first streams would end, so each measured one starts with ~1,000 open;
            # a connection for each of them, opened before the clock starts.
            seconds, warmup = min(seconds, FAKE_STREAM_S), FAKE_STREAM_S
            extra += ("--connections", str(STREAMS + STREAMS // 5))
        extra += ("--duration", f"{seconds:g}", "--warmup", f"{warmup:g}")
        return self.loadgen("rate", port, key, *extra, stream=stream, timeout_s=seconds + 60)

    # -- phases ------------------------------------------------------------------------------------------

    def run_phase(
        self, phase: str, targets: list[Target], origin: str, upstream_port: int, work: Work
    ) -> None:
        for target in targets:
            log(f"{phase}: {target.key}")
            try:
                proc, port = self.start(target, origin, upstream_port, phase)
            except RuntimeError as exc:
                self.notes.append(f"{target.key}, {phase} phase: did not start ({exc})")
                log(f"  did not start: {exc}")
                continue
            try:
                work(target, port, proc)
            except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
                self.notes.append(f"{target.key}, {phase} phase: {exc}")
                log(f"  failed: {exc}")
            finally:
                if proc is not None:
                    self.r(target)[f"rss_{phase}_mb"] = proc.peak_rss_mb()
                    proc.stop()

    def settle(self, target: Target, proc: Proc | None, after: str) -> None:
        """Wait until the target is idle, so work left over from the last run (requests wrk abandoned
        when it stopped) is not charged to the next one."""
        if proc is None:
            return
        start = time.monotonic()
        while time.monotonic() - start < 20:
            cpu0 = proc.cpu_seconds()
            time.sleep(0.25)
            if proc.cpu_seconds() - cpu0 < 0.25 * 0.05:
                break
        busy = time.monotonic() - start - 0.25
        if busy > 1.0:
            note = f"{target.key}: busy {busy:.1f}s after {after} (abandoned requests); waited for it"
            self.notes.append(note)
            log(f"  {note}")

    def json_work(self, target: Target, port: int, proc: Proc | None) -> None:
        res, key, d = self.r(target), target.client_key, self.args.duration
        self.wrk(port, key, 32, min(2.0, d), stream=False)  # warm-up, not recorded
        self.settle(target, proc, "the warm-up")
        for conns in (32, 256):
            w = res[f"wrk_{conns}"] = self.throughput(target, proc, port, conns, stream=False)
            res[f"rps_{conns}"], res[f"errors_{conns}"] = w["rps"], w["errors"]
            log(f"  {conns:>3} conns: {w['rps']:>10,.0f} req/s (runs {w['runs_rps']})  errors {w['errors']}")
        self.pyclient(port, key, 32, min(1.0, d), stream=False)  # its warm-up, not recorded
        self.settle(target, proc, "the warm-up")
        w = res["py_32"] = self.throughput(target, proc, port, 32, stream=False, client="py")
        res["py_rps_32"], res["py_errors_32"] = w["rps"], w["errors"]
        log(f"   32 conns, Python client: {w['rps']:>10,.0f} req/s  errors {w['errors']}")
        if self.args.profile and target is GW and proc is not None:
            self.profile(proc, port, key, stream=False)
            self.settle(target, proc, "the profiled run")
        lat = res["latency"] = self.fixed_rate(target, proc, port, res["rps_32"], stream=False)
        if "skipped" not in lat:
            figures = f"p50 {lat['p50_ms']} p99 {lat['p99_ms']} ms, failed {lat['failed']}"
            log(f"  {OFFERED_RPS:g} req/s: {figures}")

    def alternated(self, targets: list[Target], origin: str, upstream_port: int) -> None:
        """Metering on, metering off and two workers, alternated: AB_ROUNDS rounds, each with a fresh set
        of gateways up at once (one worker pinned to CPU 0, two on CPUs 0-1; only the one under load is
        busy) and wrk on one after the other in interleaved slices of a second (`interleaved`), at 32 and
        at 256 connections. A slow spell of the machine then slows all alike, where separate phases minutes
        apart can catch it on one side only; and fresh processes each round, because two identical
        processes measured up to 18% apart here, run after run (the memory layout each one happened to
        get). The metering and scaling checks use the medians."""
        compared = [t for t in (GW, GW_NOMETER, GW_W2) if t in targets]
        # Per (load, target), a round each: req/s, and the CPU a request (µs) of the gateway, of Postgres
        # and of the load (the load generator and nginx).
        samples: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {
            (load, target.key): [] for load, _, _ in AB_LOADS for target in compared
        }
        try:
            for i in range(AB_ROUNDS):
                self._ab_round(i, compared, origin, upstream_port, samples)
        except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
            self.notes.append(f"alternated runs: {exc}")
            log(f"  failed: {exc}")
        ab: dict[str, dict[str, Any]] = {}
        for load, _, _ in AB_LOADS:
            runs = ab[load] = {}
            for side, target in (("on", GW), ("off", GW_NOMETER), ("w2", GW_W2)):
                got = samples.get((load, target.key))
                if not got:
                    continue
                runs[side] = [x[0] for x in got]
                runs[f"{side}_cpu_us"] = [round(statistics.median(x[k] for x in got), 1) for k in (1, 2, 3)]
                # Each round's, beside its req/s: how busy the gateway's core was (report.metering_cost).
                runs[f"{side}_gateway_us"] = [round(x[1], 1) for x in got]
            if "w2" in runs:
                # The two-worker row of the table: there is no separate phase for it.
                self.r(GW_W2)[f"rps_{load}"] = statistics.median(runs["w2"])
            log(
                f"  {load:>4}, alternated: "
                + "  ".join(f"{k} {runs[k]}" for k in ("on", "off", "w2") if k in runs)
            )
        self.results["alternated"] = ab

    def _ab_round(
        self,
        i: int,
        compared: list[Target],
        origin: str,
        upstream_port: int,
        samples: dict[tuple[str, str], list[tuple[float, float, float, float]]],
    ) -> None:
        """One round of the alternated runs: a fresh set of gateways, each load on each in turn."""
        with self.fresh_round(i, compared, origin, upstream_port, f"ab{i}", stream=False) as started:
            for load, client, conns in AB_LOADS:
                sides = [s for s in started if not (client == "py" and s[0] is GW_W2)]
                got = self.interleaved(
                    f"alternated {client} at {conns} connections", sides, client, conns, False
                )
                for target, w in got.items():
                    per_request = 1e6 / max(1, w["requests"])
                    samples[(load, target.key)].append(
                        (
                            round(w["rps"], 1),
                            *(w[k] * per_request for k in ("proxy_cpu_s", "db_cpu_s", "load_cpu_s")),
                        )
                    )

    def interleaved(
        self,
        label: str,
        sides: Sequence[tuple[Target, Proc | None, int]],
        client: str,
        conns: int,
        stream: bool,
    ) -> dict[Target, dict[str, Any]]:
        """The same load on each side in turn, in slices of a second (wrk's shortest run), the order
        reversed every other slice; each side's slices summed. The VM's speed moves within seconds: here
        one process's 1-s slices of streams read from 59% to 97% of the other's, where their sums over
        eight slices, in four pairs of fresh processes, read 74-79% (bench/README.md)."""
        seconds = self.args.duration / self.args.repeats
        n = max(1, round(seconds))
        slices: dict[Target, list[dict[str, Any]]] = {target: [] for target, _, _ in sides}
        for k in range(n):
            for target, proc, port in sides if k % 2 == 0 else sides[::-1]:
                slices[target].append(
                    self.measured(
                        f"{target.key}, {label}",
                        proc,
                        partial(self.client(client), port, target.client_key, conns, seconds / n, stream),
                    )
                )
                self.settle(target, proc, f"{client} at {conns} connections")
        return {target: summed(runs) for target, runs in slices.items()}

    @contextlib.contextmanager
    def fresh_round(
        self, i: int, targets: Sequence[Target], origin: str, upstream_port: int, phase: str, *, stream: bool
    ) -> Iterator[list[tuple[Target, Proc | None, int]]]:
        """Round `i` of an alternated comparison: each target started afresh and warmed up, given in the
        order the round loads them (reversed every other round), and stopped at the end of the round."""
        started: list[tuple[Target, Proc | None, int]] = []
        try:
            for target in targets:
                proc, port = self.start(target, origin, upstream_port, phase)
                started.append((target, proc, port))
                # A warm-up, not recorded.
                self.wrk(port, target.client_key, 32, 1.0 if stream else 2.0, stream=stream)
                self.settle(target, proc, "the warm-up")
            yield started if i % 2 == 0 else started[::-1]
        finally:
            for _, proc, _ in started:
                if proc is not None:
                    proc.stop()

    def alternated_with_floor(self, phase: str, origin: str, upstream_port: int) -> None:
        """The metered gateway and the aiohttp pass-through, alternated: AB_ROUNDS rounds, each with a
        fresh pair of processes, wrk and then the Python client at 32 connections, on the two in
        interleaved slices of a second (`interleaved`). One process of the same code measured up to ±10%
        from the next here (its memory layout), the pass-through as much, and the machine's speed moves
        within seconds: the streams' ratio of the separate phases, one process each, read 61% in one run
        and 76% in the next, and the JSON ratio with the Python client 57% and 64% in two runs whose
        alternated rounds read 77-97%. The checks against the pass-through at 32 connections use the
        median of the rounds' ratios."""
        stream = phase == "stream"
        pair = (GW, FLOOR)
        rounds: dict[str, dict[str, list[float]]] = {c: {t.key: [] for t in pair} for c in ("wrk", "py")}
        what = "streams" if stream else "requests"
        try:
            for i in range(AB_ROUNDS):
                with self.fresh_round(
                    i, pair, origin, upstream_port, f"{phase}{i}", stream=stream
                ) as started:
                    for client in ("wrk", "py"):
                        got = self.interleaved(f"alternated {what}, {client}", started, client, 32, stream)
                        for target, w in got.items():
                            if w["errors"]:
                                raise RuntimeError(f"{target.key}: {w['errors']} failed {what} ({client})")
                            rounds[client][target.key].append(round(w["rps"], 1))
        except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
            self.notes.append(f"alternated {what}: {exc}")
            log(f"  failed: {exc}")
        for client, runs in rounds.items():
            log(f"  {client:>4}, alternated {what}: " + "  ".join(f"{k} {v}" for k, v in runs.items()))
        self.results[ALTERNATED_WITH_FLOOR[phase]] = rounds

    def stream_work(self, target: Target, port: int, proc: Proc | None) -> None:
        self.wrk(port, target.client_key, 32, min(1.0, self.args.duration), stream=True)
        self.settle(target, proc, "the warm-up")
        w = self.r(target)["wrk_streams"] = self.throughput(target, proc, port, 32, stream=True)
        self.r(target)["streams_per_s"], self.r(target)["stream_errors"] = w["rps"], w["errors"]
        log(f"   32 conns: {w['rps']:>10,.0f} streams/s  failed or without [DONE] {w['errors']}")
        self.pyclient(port, target.client_key, 32, min(1.0, self.args.duration), stream=True)  # warm-up
        self.settle(target, proc, "the warm-up")
        w = self.r(target)["py_streams"] = self.throughput(target, proc, port, 32, stream=True, client="py")
        self.r(target)["py_streams_per_s"], self.r(target)["py_stream_errors"] = w["rps"], w["errors"]
        log(f"   32 conns, Python client: {w['rps']:>10,.0f} streams/s  bad {w['errors']}")
        if self.args.profile and target is GW and proc is not None:
            self.profile(proc, port, target.client_key, stream=True)
            self.settle(target, proc, "the profiled run")
            self.profile(proc, port, target.client_key, stream=True, client="py")

    def burst_work(self, target: Target, port: int, proc: Proc | None) -> None:
        res, key, timeout = self.r(target), target.client_key, self.args.burst_timeout
        burst = ("--timeout", f"{timeout:g}")
        # The target: streams arriving on a schedule, each ~5 s long, so that ~1,000 are open at once.
        # Its warm-up (the first 5 s of arrivals) also warms the burst's code paths and connection pool.
        capacity = self.results.get(target.key, {}).get("streams_per_s")
        s = res["stream_latency"] = self.fixed_rate(target, proc, port, capacity, stream=True)
        if "skipped" not in s:
            log(
                f"  {OFFERED_RPS:g} streams/s, {s['peak_in_flight']} in flight at once: "
                f"TTFB p50 {s['ttfb_p50_ms']} p99 {s['ttfb_p99_ms']} ms"
            )
            self.settle(target, proc, f"{STREAMS} streams in flight")
        # Supplementary: all written in the same instant, so TTFB is mostly the admission queue.
        b = res["burst"] = self.measured(
            f"{target.key}, {STREAMS} streams at once",
            proc,
            lambda: self.loadgen(
                "burst", port, key, "--streams", str(STREAMS), *burst, stream=True, timeout_s=timeout + 60
            ),
        )
        log(f"  {STREAMS} at once: complete {b['complete']}, TTFB p99 {b['ttfb_p99_ms']} ms")

    def fixed_rate(
        self, target: Target, proc: Proc | None, port: int, capacity: float | None, *, stream: bool
    ) -> dict[str, Any]:
        """The open-loop run at OFFERED_RPS, or why it was skipped: a target that cannot sustain the rate
        would only measure its own queue."""
        unit = "streams/s" if stream else "req/s"
        if capacity is not None and capacity < OFFERED_RPS * 1.2:
            return {"skipped": f"capacity {capacity:.0f} {unit}"}
        return self.measured(
            f"{target.key}, {OFFERED_RPS:g} {unit} open loop",
            proc,
            lambda: self.open_loop(port, target.client_key, stream=stream),
        )

    def profile(self, proc: Proc, port: int, key: str, *, stream: bool, client: str = "wrk") -> None:
        py_spy, name = ensure_py_spy(), ("stream" if stream else "json") + ("-py" if client == "py" else "")
        seconds = max(8.0, self.args.duration)
        raw = self.run_dir / f"profile-gw-{name}-c32.txt"
        # --nonblocking: stopping every thread for each sample slows a process with a thread pool ~20x.
        cmd = ["taskset", "-c", LOAD_CPUS, str(py_spy), "record", "--pid", str(proc.pid), "--nonblocking"]
        cmd += ["--rate", "200"]
        cmd += ["--duration", f"{seconds:.0f}", "--format", "raw", "-o", str(raw)]
        log(f"  py-spy record, {seconds:.0f}s at 32 connections ({name})")
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        w = self.client(client)(port, key, 32, seconds + 1, stream)
        spy.wait(timeout=60)
        summary = (
            f"{w['rps']:,.0f}/s at 32 connections while sampled (py-spy --nonblocking, 200 Hz)\n"
            + summarize_profile(raw)
        )
        (self.run_dir / f"profile-gw-{name}-summary.txt").write_text(summary)

    def recorder_bench(self) -> None:
        if not RECORDER_BENCH.exists():
            return
        log("recorder benchmark: bench/recorder_bench.py")
        cmd = ["taskset", "-c", PROXY_CPUS, str(GATEWAY_PY), str(RECORDER_BENCH), "--admin-url", PG_ADMIN_URL]
        if self.args.quick:
            cmd += ["--events", "50000"]
        try:
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            self.results["recorder"] = {"line": "did not finish within 300 s", "ok": False}
            return
        (self.logdir / "recorder_bench.log").write_text(out.stdout + out.stderr)
        lines = [x.strip() for x in out.stdout.splitlines() if x.strip()]
        last = lines[-1] if lines else f"no output (exit {out.returncode})"
        self.results["recorder"] = {"line": last, "ok": out.returncode == 0, "stdout": out.stdout[-4000:]}


def summed(slices: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Slices of one load on one side (Runner.interleaved) as one run: its requests, time, errors and CPU
    added up, the busiest reading of other processes kept."""
    total: dict[str, Any] = {k: sum(w[k] for w in slices) for k in _SUMMED}
    total["rps"] = total["requests"] / (total["duration_us"] / 1e6) if total["duration_us"] else 0.0
    total["other_cpus"] = max(w["other_cpus"] for w in slices)
    total["slices_rps"] = [round(w["rps"], 1) for w in slices]
    return total


_SUMMED = ("requests", "duration_us", "errors", "proxy_cpu_s", "db_cpu_s", "load_cpu_s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short runs and no LiteLLM, for development")
    parser.add_argument("--duration", type=float, help="seconds of wrk per figure (default 8; quick 3)")
    parser.add_argument("--repeats", type=int, help="wrk runs per figure, best kept (default 2; quick 1)")
    parser.add_argument(
        "--latency-duration", type=float, help="seconds per open-loop run (default 8; quick 4)"
    )
    parser.add_argument(
        "--burst-timeout", type=float, help="seconds a 1,000-stream burst may take (default 60)"
    )
    parser.add_argument("--no-litellm", action="store_true", help="leave LiteLLM out")
    parser.add_argument("--litellm", action="store_true", help="include LiteLLM even with --quick")
    parser.add_argument("--profile", action="store_true", help="py-spy the metered gateway at 32 connections")
    parser.add_argument(
        "--only", help="targets: direct,passthrough,passthrough_rq,litellm,gw,gw_nometer,gw_w2"
    )
    parser.add_argument("--phases", default="json,stream,burst", help="any of json,stream,burst")
    parser.add_argument("--keep-db", action="store_true", help=f"keep the {BENCH_DB} database afterwards")
    args = parser.parse_args(argv)
    args.duration = args.duration or (3.0 if args.quick else 8.0)
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.latency_duration = args.latency_duration or (4.0 if args.quick else 8.0)
    args.burst_timeout = args.burst_timeout or (20.0 if args.quick else 60.0)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("bench: needs 2 CPUs (the proxy on CPU 0, the load on CPU 1)")
    if not GATEWAY_BIN.exists():
        raise SystemExit("bench: the gateway is not installed in .venv; run `make install`")
    run_dir = RESULTS / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir.mkdir(parents=True, exist_ok=True)
    tools = ensure_tools()
    runner = Runner(args, tools, run_dir)

    targets = [DIRECT, FLOOR, FLOOR_RQ, GW, GW_NOMETER, GW_W2]
    litellm_version = "left out"
    if not args.no_litellm and (args.litellm or not args.quick) and (not args.only or "litellm" in args.only):
        runner.litellm_bin, litellm_version = ensure_litellm(timeout_s=420)
        if runner.litellm_bin is None:
            runner.notes.append(f"LiteLLM column skipped: {litellm_version}")
            litellm_version = "not installed"
        else:
            targets.insert(2, LITELLM)
    if args.only:
        targets = [t for t in targets if t.key in set(args.only.split(","))]
    phases = set(args.phases.split(","))
    single = [t for t in targets if t.workers == 1]

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    busy = cpu_busy_percent()
    if busy > 15:
        log(f"warning: the machine is {busy:.0f}% busy before the run; the figures will be noisy")
    meta = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "make bench" + (f" BENCH_ARGS='{' '.join(argv)}'" if argv else ""),
        "cpus": os.cpu_count(),
        "cpu_model": next(
            (
                x.split(":", 1)[1].strip()
                for x in Path("/proc/cpuinfo").read_text().splitlines()
                if "model name" in x
            ),
            "?",
        ),
        "python": sys.version.split()[0],
        "nginx": _first_line([tools["nginx"], "-v"]).replace("nginx version: ", ""),
        "wrk": _first_line([tools["wrk"], "-v"]).split(" [")[0],
        "litellm": litellm_version,
        "duration": args.duration,
        "latency_duration": args.latency_duration,
        "background_busy": busy,
        "pinning": {"proxy": PROXY_CPUS, "workers2": WORKERS2_CPUS, "load": LOAD_CPUS},
    }
    gateway = any(t.kind == "gateway" for t in targets)
    try:
        if gateway:
            create_db()
        if phases & {"json", "stream"}:
            nginx, json_port, sse_port = start_nginx(tools["nginx"], run_dir, runner.logdir)
            runner.upstream = nginx
            if "json" in phases:
                runner.run_phase("json", single, f"http://127.0.0.1:{json_port}", json_port, runner.json_work)
                if GW in targets and FLOOR in targets:
                    log("json: the gateway and the pass-through, alternated")
                    runner.alternated_with_floor("json", f"http://127.0.0.1:{json_port}", json_port)
                if GW in targets and (GW_NOMETER in targets or GW_W2 in targets):
                    log("json: metering on, off and two workers, alternated")
                    runner.alternated(targets, f"http://127.0.0.1:{json_port}", json_port)
            if "stream" in phases:
                runner.run_phase(
                    "stream", single, f"http://127.0.0.1:{sse_port}", sse_port, runner.stream_work
                )
                if GW in targets and FLOOR in targets:
                    log("stream: the gateway and the pass-through, alternated")
                    runner.alternated_with_floor("stream", f"http://127.0.0.1:{sse_port}", sse_port)
            nginx.stop()
        if "burst" in phases:
            fake, fake_port = start_fake(runner.logdir)
            runner.upstream = fake
            runner.run_phase("burst", single, f"http://127.0.0.1:{fake_port}", fake_port, runner.burst_work)
            fake.stop()
        if gateway:
            runner.r(GW)["usage_rows"] = usage_rows()
            runner.recorder_bench()
    except KeyboardInterrupt:
        log("interrupted: stopping what this run started")
        return 130
    finally:
        stop_all()
        if gateway and not args.keep_db:
            drop_db()

    table = render(runner.results, runner.notes, meta)
    results = {"meta": meta, "results": runner.results, "notes": runner.notes}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (run_dir / "table.md").write_text(table)
    (RESULTS / "latest.md").write_text(table)
    print(table)
    log(f"done; results in {run_dir.relative_to(ROOT)}")
    return 0


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "?"


if __name__ == "__main__":
    sys.exit(main())
