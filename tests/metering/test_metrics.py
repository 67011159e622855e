"""The hand-kept counters and histograms expose what prometheus_client's own would."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from app.call.record import CallRecord, Usage
from app.config_file import FeatureConfig, GatewayConfig
from app.metering.metrics import Metrics
from app.metering.pricing import PriceTable


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
    }


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    metrics = Metrics()
    call = CallRecord(request_id="r", method="POST", path="/v1/chat/completions")
    call.outcome.status_code, call.outcome.attempts = 200, 2
    for seconds in (0.005, 0.007, 0.3, 400.0):
        metrics.observe_request("/v1/chat/completions", call, seconds)
    samples = _samples(metrics)
    route = ("route", "/v1/chat/completions")

    def bucket(le: str) -> float:
        return samples[("gateway_request_duration_seconds_bucket", tuple(sorted((("le", le), route))))]

    assert bucket("0.005") == 1  # a value on a bound counts in that bucket (le: less or equal)
    assert bucket("0.01") == 2
    assert bucket("0.25") == 2
    assert bucket("0.5") == 3
    assert bucket("300.0") == 3
    assert bucket("+Inf") == 4
    assert samples[("gateway_request_duration_seconds_count", (route,))] == 4
    assert samples[("gateway_request_duration_seconds_sum", (route,))] == 0.005 + 0.007 + 0.3 + 400.0
    assert samples[("gateway_requests_total", (route, ("status", "200")))] == 4
    assert samples[("gateway_upstream_attempts_total", (route,))] == 8
    assert ("gateway_time_to_first_byte_seconds_count", (route,)) not in samples


def test_workers_merge_counters_by_sum_and_shared_gauges_once(tmp_path: Path) -> None:
    """A scrape of one worker answers for all: counters add up, a flag takes the largest, and a gauge every
    worker reads from the same stored numbers (the reconciliation's) counts once, not once per worker."""
    metrics = Metrics()
    metrics.share(tmp_path)
    call = CallRecord(request_id="r", method="POST", path="/v1/chat/completions")
    call.outcome.status_code, call.outcome.attempts = 200, 1
    metrics.observe_request("/v1/chat/completions", call, 0.01)
    other = [
        [
            "gateway_requests",
            "counter",
            "",
            [["gateway_requests_total", {"route": "/v1/chat/completions", "status": "200"}, 2.0]],
        ],
        ["gateway_limits_degraded", "gauge", "", [["gateway_limits_degraded", {}, 1.0]]],
        [
            "gateway_reconciliation_relative_difference",
            "gauge",
            "",
            [["gateway_reconciliation_relative_difference", {"measure": "cost"}, 0.25]],
        ],
        [
            "gateway_reconciliation_day_timestamp_seconds",
            "gauge",
            "",
            [["gateway_reconciliation_day_timestamp_seconds", {}, 86400.0]],
        ],
    ]
    relative, day = other[2:]
    # This worker: not degraded, and the same stored reconciliation numbers as the other.
    mine = [["gateway_limits_degraded", "gauge", "", [["gateway_limits_degraded", {}, 0.0]]], relative, day]
    # Another live worker (this test's parent process stands in for it), and this one's own families.
    (tmp_path / f"{os.getppid()}.json").write_bytes(orjson.dumps(other))
    metrics.registry.register(_Fixed(mine))
    samples = _samples(metrics)
    route = (("route", "/v1/chat/completions"), ("status", "200"))
    assert samples[("gateway_requests_total", route)] == 3
    assert samples[("gateway_limits_degraded", ())] == 1
    assert samples[("gateway_reconciliation_relative_difference", (("measure", "cost"),))] == 0.25
    assert samples[("gateway_reconciliation_day_timestamp_seconds", ())] == 86400.0


class _Fixed:
    """Families as a worker's registry yields them: [name, kind, documentation, [[sample, labels, value]]]."""

    def __init__(self, families: list[list[Any]]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        for name, kind, documentation, samples in self._families:
            family = Metric(name, documentation or name, kind)
            for sample_name, labels, value in samples:
                family.add_sample(sample_name, labels, value)
            yield family


def test_a_calls_usage_labels_are_kept_until_the_configuration_changes() -> None:
    """The labels of a call's (model, answering model, feature) are looked up once and kept; a reload that
    names a feature gives it its own label from then on, where it counted under `other` before."""
    metrics = Metrics(max_features=1)
    config, prices = GatewayConfig(), PriceTable({})
    metrics.configure_labels(config, prices)
    usage = Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15, cached_tokens=4)
    metrics.observe_usage("gpt-4o", "gpt-4o-2024-08-06", "search", usage, 25_000_000)
    metrics.observe_usage("gpt-4o", "gpt-4o", "chat", usage, 10_000_000)  # no spare feature label left
    metrics.observe_usage("gpt-4o", "gpt-4o", "chat", usage, None)
    metrics.observe_usage("made-up", "made-up", "", usage, None)
    metrics.configure_labels(GatewayConfig(features={"chat": FeatureConfig()}), prices)
    metrics.observe_usage("gpt-4o", "gpt-4o", "chat", usage, 30_000_000)
    tokens = {
        ("gpt-4o", "gpt-4o", "search"): 1,
        ("gpt-4o", "gpt-4o", "other"): 2,
        ("other", "other", ""): 1,
        ("gpt-4o", "gpt-4o", "chat"): 1,
    }

    def named(model: str, upstream_model: str, feature: str, **more: str) -> tuple[tuple[str, str], ...]:
        return tuple(
            sorted({"model": model, "upstream_model": upstream_model, "feature": feature, **more}.items())
        )

    samples = _samples(metrics)
    assert {k: v for k, v in samples.items() if k[0] == "gateway_tokens_total"} == {
        ("gateway_tokens_total", named(*labels, kind=kind)): calls * count
        for labels, calls in tokens.items()
        for kind, count in (("prompt", 10), ("completion", 5), ("cached", 4))
    }
    # Summed in units of 1e-10 USD, exact, and only where a call was priced.
    assert {k: v for k, v in samples.items() if k[0] == "gateway_cost_usd_total"} == {
        ("gateway_cost_usd_total", named("gpt-4o", "gpt-4o", "search")): 0.0025,
        ("gateway_cost_usd_total", named("gpt-4o", "gpt-4o", "other")): 0.001,
        ("gateway_cost_usd_total", named("gpt-4o", "gpt-4o", "chat")): 0.003,
    }
