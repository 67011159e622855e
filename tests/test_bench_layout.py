"""The benchmark's CPU layout and the scaling bound it prints: the part of `make bench` a 2-core machine
cannot exercise (3 or more CPUs) and the arithmetic behind its verdict."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from harness import cpu_sets
from report import _scaling_verdict, _shared_cores_bound, checks, metering_cost


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        (2, ("0", "0,1", "1")),  # the load shares CPU 1 with the second worker
        (3, ("0", "0,1", "2")),
        (8, ("0", "0,1", "2,3,4,5,6,7")),
    ],
)
def test_two_workers_get_their_own_cores_when_there_are_three_or_more(
    count: int, expected: tuple[str, str, str]
) -> None:
    assert cpu_sets(count) == expected


def test_the_bound_counts_the_load_on_the_workers_cores() -> None:
    # 127 µs of the workers, 34 of wrk and nginx, 14 of Postgres: 2 s / 175 µs = 11,429 req/s.
    runs = {"w2_cpu_us": [127.0, 14.0, 34.0]}
    text = _shared_cores_bound(runs, 7812.0, {"proxy": "0", "workers2": "0,1", "load": "1"})
    assert "11,429 req/s" in text
    assert "1.46x one worker" in text


def test_no_bound_when_the_load_has_cores_of_its_own() -> None:
    runs = {"w2_cpu_us": [127.0, 14.0, 34.0]}
    assert _shared_cores_bound(runs, 7812.0, {"proxy": "0", "workers2": "0,1", "load": "2,3"}) == ""
    # Results recorded before the load's CPU was: no bound either.
    assert _shared_cores_bound({"w2_cpu_us": [127.0, 14.0]}, 7812.0, {"workers2": "0,1", "load": "1"}) == ""


def test_the_instruction_counts_are_set_against_the_pass_through_and_metering_off() -> None:
    from instructions import report

    counted = {
        ("stream", "passthrough"): 500_000.0,
        ("stream", "gw"): 760_000.0,
        ("stream", "gw_nometer"): 720_000.0,
        ("json", "gw"): 600_000.0,
    }
    text = report(counted, client_body=False)
    assert "| stream | gw | 760,000 | 66% |" in text
    assert "| json | gw | 600,000 | - |" in text  # no pass-through counted for that phase
    assert "stream: metering costs +40,000 instructions a call (+5.6%)" in text
    assert "json: metering" not in text
    assert "(200 calls counted, one at a time; wrk's bodies)" in text


def test_calls_in_flight_are_counted_in_whole_rounds_of_connections() -> None:
    from instructions import report, sizes

    assert sizes(1) == (20, 200)
    assert sizes(32) == (32, 224)  # one call a connection at least, and every connection as many
    assert sizes(8) == (24, 200)
    text = report({("stream", "gw"): 720_000.0}, 224, client_body=True, in_flight=32)
    assert "(224 calls counted, 32 in flight; the Python client's bodies)" in text


def test_the_figures_against_the_pass_through_at_32_connections_are_the_alternated_rounds() -> None:
    results = {
        # The separate phases, one process each: the Python client's JSON figure reads 50% there.
        "gw": {"rps_32": 900.0, "py_rps_32": 500.0, "streams_per_s": 600.0, "py_streams_per_s": 600.0},
        "passthrough": {"rps_32": 1000.0, "py_rps_32": 1000.0, "streams_per_s": 1000.0},
        "alternated_json": {
            "wrk": {"gw": [60.0, 90.0, 95.0], "passthrough": [100.0, 100.0, 100.0]},
            "py": {"gw": [72.0, 80.0, 40.0], "passthrough": [100.0, 100.0, 100.0]},
        },
        # Rounds that do not pair up are not used: the separate phases are.
        "alternated_streams": {"wrk": {"gw": [1.0], "passthrough": []}},
    }
    pinning = {"proxy": "0", "workers2": "0,1", "load": "1"}
    rows = {row[0].split(" (")[0]: row for row in checks(results, pinning)}
    json_py = rows["JSON req/s, 1 worker, metering on, 32 conns, Python client"]
    assert "3 rounds alternated" in json_py[0] and "(72%)" in json_py[1] and json_py[4] == "PASS"
    assert "separate phases: 500 / 1,000 = 50%" in json_py[2]
    json_wrk = rows["JSON req/s, 1 worker, metering on, 32 conns"]
    assert "(90%)" in json_wrk[1] and json_wrk[4] == "PASS"
    streams = rows["streams/s, 1 worker, metering on, 32 conns"]
    assert "rounds" not in streams[0] and "(60%)" in streams[1] and streams[4] == "**FAIL**"


def test_a_sides_slices_add_up_to_one_run() -> None:
    from run import summed

    def slice_(requests: int, seconds: float, errors: int, other: float) -> dict[str, float]:
        return {
            "requests": requests,
            "duration_us": seconds * 1e6,
            "errors": errors,
            "proxy_cpu_s": seconds * 0.9,
            "db_cpu_s": 0.1,
            "load_cpu_s": 0.2,
            "other_cpus": other,
            "rps": requests / seconds,
        }

    total = summed([slice_(6000, 1.0, 0, 0.0), slice_(3000, 1.0, 1, 0.3), slice_(3000, 1.0, 0, 0.1)])
    # The requests over the time of all slices, not the mean of the slices' rates.
    assert total["rps"] == 4000.0 and total["requests"] == 12000 and total["errors"] == 1
    assert total["proxy_cpu_s"] == pytest.approx(2.7) and total["other_cpus"] == 0.3
    assert total["slices_rps"] == [6000.0, 3000.0, 3000.0]


def test_scaling_is_judged_only_where_the_workers_have_their_own_cores() -> None:
    def verdict(ok: bool | None) -> str:
        return "-" if ok is None else ("PASS" if ok else "FAIL")

    shared = {"proxy": "0", "workers2": "0,1", "load": "1"}
    own = {"proxy": "0", "workers2": "0,1", "load": "2,3"}
    assert _scaling_verdict(11_000.0, 7_800.0, shared, verdict) == "measured (shared cores)"
    assert _scaling_verdict(11_000.0, 7_800.0, own, verdict) == "FAIL"
    assert _scaling_verdict(13_500.0, 7_800.0, own, verdict) == "PASS"
    assert _scaling_verdict(None, 7_800.0, own, verdict) == "-"


def _rounds(on: float, off: float, on_us: float, off_us: float) -> dict[str, list[float]]:
    """Three alike rounds of the alternated metering comparison: req/s and the gateway's CPU a request."""
    return {
        "on": [on] * 3,
        "off": [off] * 3,
        "on_gateway_us": [on_us] * 3,
        "off_gateway_us": [off_us] * 3,
    }


def test_the_metering_cost_is_the_throughputs_while_the_gateway_bounds_it_on_both_sides() -> None:
    # wrk, 2026-12-06 12:14: both gateways ~99% busy; 1 - 4,667/5,029.
    cost, judged = metering_cost(_rounds(4667.0, 5029.0, 212.9, 197.9))
    assert cost == pytest.approx(1 - 4667 / 5029)
    assert judged == ""


def test_the_metering_cost_is_the_gateways_cpu_where_the_load_left_it_waiting() -> None:
    # The Python client the same run: metering on, the gateway 93% busy (3,862 req/s x 239.8 µs), off 99%.
    runs = _rounds(3862.0, 4268.0, 239.8, 231.5)
    cost, judged = metering_cost(runs)
    assert cost == pytest.approx(1 - 231.5 / 239.8)
    assert "busy 93% of its turns metering on, 99% off" in judged
    assert "the throughput's cost (+9.5%) measured" in judged
    # Idle on the unmetered side only: judged on the CPU too, whichever way it would have erred.
    cost, judged = metering_cost(_rounds(4000.0, 3400.0, 240.0, 230.0))
    assert cost == pytest.approx(1 - 230 / 240)
    assert "78% off" in judged


def test_results_without_each_rounds_cpu_are_judged_on_the_throughput() -> None:
    runs = {"on": [3862.0], "off": [4268.0], "on_cpu_us": [239.8, 26.4, 220.7]}
    assert metering_cost(runs) == (pytest.approx(1 - 3862 / 4268), "")


def test_the_streams_ttfb_says_how_much_cpu_the_load_asked_of_the_proxys_core() -> None:
    # 2026-12-07 09:11, the slowest VM met: 5.6 ms of CPU a stream at 200 streams/s is more than a core.
    def run(cpu_s: float | None, ttfb_p99_ms: float) -> dict[str, object]:
        timing = {"ok": 1004, "measured": 1004, "peak_in_flight": 1098, "ttfb_p99_ms": ttfb_p99_ms}
        return {"stream_latency": {**timing, "proxy_cpu_s": cpu_s, "started": 2000}}

    results = {"gw": run(11.22, 179.48), "passthrough": run(10.07, 390.43), "direct": run(None, 98.24)}
    pinning = {"proxy": "0", "workers2": "0,1", "load": "1"}
    rows = {row[0].split(" (")[0]: row for row in checks(results, pinning)}
    ttfb = rows["1000 concurrent streams: TTFB overhead p99"]
    assert ttfb[1].startswith("+81.24 ms") and ttfb[4] == "**FAIL**"
    assert "pass-through +292.19 ms" in ttfb[2]
    assert "asks of the proxy's one core: 1.12 cores (pass-through 1.01)" in ttfb[2]
