"""Instructions a call costs each proxy, counted by valgrind: the same count run after run, where the CPU
time of a shared VM is not.

    .venv/bin/python bench/instructions.py [--phases stream,json] [--client-body] [--in-flight N]
                                           [--only passthrough,passthrough_rq,gw,gw_nometer]

Each proxy is started as `make bench` starts it, in front of the same nginx upstream, but under valgrind's
callgrind, twice: one run is sent FEW calls, the other FEW + COUNTED, one after another over one
keep-alive connection (wrk's request bodies, or the Python client's with --client-body), or with
--in-flight N over N connections at once, as a loaded proxy serves them: what a proxy does once for all
the calls that end in one pass of its event loop (the gateway's access-log write, say) is then shared as
under load. The difference of the two runs' instruction totals, over COUNTED, is what one call executes
in the proxy's process: its start-up, warm-up and shutdown cancel out. Whatever else the machine does,
the same code counted within 1% from run to run for the pass-throughs and the metered gateway, where one
process's CPU time a stream moved by 30% from one run to the next on the VMs `make bench` runs on. The
unmetered gateway's counts were 5% apart once: the gateway's timers (the recorder's flushes, the sweep
for clients that left) fire by the clock, and a call under valgrind takes ~50 times as long, so they
fire more often a call than at full speed, and not as often in every run. Differences of a few percent
are within that; so is the metering cost (the difference of two such counts), which read from +3% to
+12% of a call.

What it leaves out: time. Memory stalls, the kernel's share of a call (system calls, the loopback) and
the other threads' waits are not instructions, and one call at a time shares nothing between calls. It
is the figure to judge a change of the proxy's own code by, next to `make bench`'s throughput; the ratio
of two proxies' counts is an estimate of their throughput ratio, not a measurement of it (bench/README.md
has both, side by side).

Under valgrind a process runs ~50x slower: the gateway's recorder flushes every 10 s instead of 0.2 s,
so that its batches keep about the size they have at full speed. A run takes about a minute.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from harness import (
    BENCH,
    create_db,
    drop_db,
    ensure_tools,
    log,
    request_body,
    start_nginx,
    stop_all,
)
from run import FLOOR, FLOOR_RQ, GW, GW_NOMETER, Runner, Target

FEW, COUNTED = 20, 200
CALLGRIND = ("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null")
# The recorder's flush interval under valgrind (its default is 0.2 s at full speed).
FLUSH_S = "10"
TARGETS = (FLOOR, FLOOR_RQ, GW, GW_NOMETER)
_TOTAL = re.compile(rb"I\s+refs:\s+([\d,]+)")


def calls(port: int, key: str, body: bytes, n: int, stream: bool, in_flight: int = 1) -> None:
    """`n` calls, `in_flight` at once, each connection's one after another, each read to its end."""
    if in_flight > 1:
        with ThreadPoolExecutor(in_flight) as pool:
            for done in [
                pool.submit(calls, port, key, body, n // in_flight, stream) for _ in range(in_flight)
            ]:
                done.result()
        return
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    try:
        for _ in range(n):
            connection.request("POST", "/v1/chat/completions", body=body, headers=headers)
            response = connection.getresponse()
            answer = response.read()
            if response.status != 200 or (stream and b"data: [DONE]" not in answer):
                raise RuntimeError(f"HTTP {response.status}: {answer[:200]!r}")
    finally:
        connection.close()


def total(
    runner: Runner, target: Target, origin: str, port: int, phase: str, body: bytes, n: int, in_flight: int
) -> int:
    """The instructions the target's process executed, from its start to its end, serving `n` calls."""
    proc, proxy_port = runner.start(target, origin, port, phase, under=CALLGRIND, ready_s=600)
    assert proc is not None
    seen = proc.log_path.stat().st_size
    try:
        calls(proxy_port, target.client_key, body, n, stream=phase == "stream", in_flight=in_flight)
    finally:
        # Its summary is written once it has shut down, which takes valgrind a while.
        proc.stop(grace_s=600)
    with proc.log_path.open("rb") as f:
        f.seek(seen)
        found = _TOTAL.findall(f.read())
    if not found:
        raise RuntimeError(f"{target.key}: valgrind printed no total; see {proc.log_path}")
    return int(found[-1].replace(b",", b""))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--phases", default="stream", help="any of stream,json")
    parser.add_argument("--client-body", action="store_true", help="bench/pyclient.py's bodies")
    parser.add_argument("--only", help="targets: " + ",".join(t.key for t in TARGETS))
    parser.add_argument("--in-flight", type=int, default=1, help="calls at once, each on a connection")
    args = parser.parse_args()
    few, counted = sizes(args.in_flight)
    targets = [t for t in TARGETS if not args.only or t.key in args.only.split(",")]
    os.environ["GATEWAY_RECORDER_FLUSH_INTERVAL_S"] = FLUSH_S
    run_dir = BENCH / "results" / (datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-instructions")
    runner = Runner(argparse.Namespace(quick=True), ensure_tools(), run_dir)
    nginx, json_port, sse_port = start_nginx(runner.tools["nginx"], run_dir, runner.logdir)
    create_db()
    counts: dict[tuple[str, str], float] = {}
    try:
        for phase in args.phases.split(","):
            stream = phase == "stream"
            port = sse_port if stream else json_port
            origin = f"http://127.0.0.1:{port}"
            body = request_body(stream=stream, client=args.client_body).read_bytes()
            for target in targets:
                first = total(runner, target, origin, port, phase, body, few, args.in_flight)
                more = total(runner, target, origin, port, phase, body, few + counted, args.in_flight)
                per_call = counts[(phase, target.key)] = (more - first) / counted
                log(f"{phase}: {target.key} {per_call:,.0f} instructions a call")
    finally:
        stop_all()
        nginx.stop()
        drop_db()
    print(report(counts, counted, client_body=args.client_body, in_flight=args.in_flight))
    return 0


def sizes(in_flight: int) -> tuple[int, int]:
    """The calls of the short run and the calls counted on top of them: FEW and COUNTED, or with calls in
    flight the nearest multiples of their number (one call a connection at least)."""
    if in_flight == 1:
        return FEW, COUNTED
    return in_flight * -(-FEW // in_flight), in_flight * -(-COUNTED // in_flight)


def report(
    counted: dict[tuple[str, str], float], calls: int = COUNTED, *, client_body: bool, in_flight: int = 1
) -> str:
    at_once = "one at a time" if in_flight == 1 else f"{in_flight} in flight"
    lines = [
        f"instructions a call ({calls} calls counted, {at_once}; "
        f"{'the Python client' if client_body else 'wrk'}'s bodies)",
        "",
        "| phase | target | instructions a call | the pass-through's count / this one's |",
        "|---|---|---|---|",
    ]
    for (phase, key), n in counted.items():
        floor = counted.get((phase, FLOOR.key))
        ratio = f"{floor / n:.0%}" if floor else "-"
        lines.append(f"| {phase} | {key} | {n:,.0f} | {ratio} |")
    for phase in dict.fromkeys(phase for phase, _ in counted):
        on, off = counted.get((phase, GW.key)), counted.get((phase, GW_NOMETER.key))
        if on and off:
            lines.append(
                f"\n{phase}: metering costs {on - off:+,.0f} instructions a call ({on / off - 1:+.1%})"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
