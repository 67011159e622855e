"""Variants of the metered gateway side by side: which of two versions of the code, or of two settings,
costs less CPU a call.

    .venv/bin/python bench/ab.py [--phase stream|json] [--rounds 6] [--slices 6] [--client wrk|py]
                                 [--connections 32] NAME=SPEC NAME=SPEC [...]

SPEC is the code, then settings, comma-separated. The code is `.` (this checkout as it is, uncommitted
changes included) or a git revision (`HEAD~1`, a branch, a commit), whose tracked files are exported into
a temporary directory and imported instead of this checkout's (with this checkout's venv: a revision that
needs other dependencies fails to start). A setting is NAME=VALUE in that gateway's environment, over the
benchmark's own (`GATEWAY_METERING=false`, `GATEWAY_LOG_LEVEL=warning`, `GATEWAY_SSE_KEEPALIVE_S=0`...).

    bench/ab.py before=HEAD after=.                  # a change against its base
    bench/ab.py on=. off=.,GATEWAY_METERING=false    # what a setting costs
    bench/ab.py a=. b=.                              # the method's own spread on this VM

Each round starts every variant afresh as `make bench` starts the metered gateway (one process on CPU 0,
nginx's canned answer, the load and the bench database's Postgres on the other CPUs), warms each up, then
loads each in turn in 1-s slices at 32 connections, the order reversed every other slice and every other
round, as `make bench` compares the gateway with the pass-through. A variant's cost in a round is its
process's CPU over its slices' calls. The report gives each variant's median over the rounds, and its
difference from the first variant's in each round, with how many rounds it was the cheaper.

Why not one run after another: on these VMs a process's CPU a stream rose from ~210 to ~290 µs within
two minutes of sustained load, so whichever variant runs later reads slower. Run one after another (three
runs each), the gateway with jemalloc preloaded read 19% cheaper a stream; interleaved, as here, the
same as without (docs/performance-log.md, twenty-first round). Differences smaller than an A/A run's
spread are not told apart by it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from harness import BENCH, ROOT, create_db, drop_db, ensure_tools, log, start_nginx, stop_all
from run import Runner, Target

# First on an exported revision's PYTHONPATH: the editable install's import hook would otherwise find
# this checkout's `app` before the revision's.
_SITECUSTOMIZE = (
    "import sys\n"
    "sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith('__editable__')]\n"
)


@dataclass(frozen=True)
class Variant:
    name: str
    # None: this checkout as it is.
    revision: str | None
    settings: tuple[tuple[str, str], ...]


def parse_variant(text: str) -> Variant:
    """`NAME=SPEC` as the command line gives it."""
    name, _, spec = text.partition("=")
    code, *settings = spec.split(",")
    if not name or not code:
        raise ValueError(f"{text!r}: expected NAME=CODE[,SETTING=VALUE...], CODE '.' or a git revision")
    # It names the variant's directories and processes.
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"{text!r}: a name is letters, digits, '-' and '_'")
    pairs = []
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key:
            raise ValueError(f"{text!r}: a setting is NAME=VALUE, not {setting!r}")
        pairs.append((key, value))
    return Variant(name, None if code == "." else code, tuple(pairs))


def export(revision: str, into: Path) -> None:
    """The revision's tracked files, as `git archive` gives them, with the import hook put aside."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    (into / "sitecustomize.py").write_text(_SITECUSTOMIZE)


def target(variant: Variant, code: Path | None) -> Target:
    env = variant.settings if code is None else (("PYTHONPATH", str(code)), *variant.settings)
    return Target(f"ab-{variant.name}", "gateway", metering=True, env=env)


def report(names: Sequence[str], costs: dict[str, list[float]], rates: dict[str, list[float]]) -> str:
    """Each variant's CPU a call (µs) and calls/s over the rounds, and each one's difference from the first
    variant's in the same round."""
    first = costs[names[0]]
    lines = [
        f"CPU a call, µs, over {len(first)} rounds (the median; each round), calls/s (the median), and the "
        f"difference from `{names[0]}` in each round",
        "",
        "| variant | CPU a call | each round | calls/s | against the first (median) | rounds cheaper |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        own = costs[name]
        median = statistics.median(own)
        rounds = ", ".join(f"{c:.1f}" for c in own)
        rate = statistics.median(rates[name])
        if name == names[0]:
            lines.append(f"| {name} | {median:.1f} | {rounds} | {rate:,.0f} | - | - |")
            continue
        diffs = [c - f for c, f in zip(own, first, strict=True)]
        change = statistics.median(diffs)
        cheaper = sum(d < 0 for d in diffs)
        lines.append(
            f"| {name} | {median:.1f} | {rounds} | {rate:,.0f} | {change:+.1f} µs "
            f"({change / statistics.median(first):+.1%}) | {cheaper} of {len(diffs)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("variants", nargs="+", metavar="NAME=SPEC")
    parser.add_argument("--phase", choices=("stream", "json"), default="stream")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--slices", type=int, default=6, help="1-s slices of load on each variant a round")
    parser.add_argument("--client", choices=("wrk", "py"), default="wrk")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.slices < 1:
        parser.error("--rounds and --slices take 1 or more")
    try:
        variants = [parse_variant(text) for text in args.variants]
    except ValueError as exc:
        parser.error(str(exc))
    names = [v.name for v in variants]
    if len(variants) < 2 or len(set(names)) != len(names):
        parser.error("give two or more variants, each with a name of its own")
    stream = args.phase == "stream"
    run_dir = BENCH / "results" / (datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-ab")
    # `make bench`'s interleaved slices: `slices` runs of a second each.
    runner = Runner(argparse.Namespace(quick=True, duration=args.slices, repeats=1), ensure_tools(), run_dir)
    costs: dict[str, list[float]] = {name: [] for name in names}
    rates: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="ab-") as scratch:
        targets = []
        for variant in variants:
            code = None
            if variant.revision is not None:
                code = Path(scratch) / variant.name
                code.mkdir()
                try:
                    export(variant.revision, code)
                except subprocess.CalledProcessError as exc:
                    why = exc.stderr.decode().strip()
                    parser.error(f"{variant.name}: git cannot export {variant.revision!r}: {why}")
            targets.append(target(variant, code))
        nginx, json_port, sse_port = start_nginx(runner.tools["nginx"], run_dir, runner.logdir)
        port = sse_port if stream else json_port
        create_db()
        try:
            for i in range(args.rounds):
                with runner.fresh_round(
                    i, targets, f"http://127.0.0.1:{port}", port, f"{args.phase}{i}", stream=stream
                ) as started:
                    got = runner.interleaved("variants", started, args.client, args.connections, stream)
                for variant, t in zip(variants, targets, strict=True):
                    w = got[t]
                    if w["errors"] or not w["requests"]:
                        raise RuntimeError(f"{variant.name}: {w['errors']} failed calls of {w['requests']}")
                    costs[variant.name].append(w["proxy_cpu_s"] / w["requests"] * 1e6)
                    rates[variant.name].append(w["rps"])
                log(f"round {i + 1}: " + "  ".join(f"{n} {costs[n][-1]:.1f} µs" for n in names))
        finally:
            stop_all()
            nginx.stop()
            drop_db()
    text = report(names, costs, rates)
    (run_dir / "ab.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
