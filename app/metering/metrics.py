"""Prometheus metrics: one registry per app (not the process-global one), filled per request.

The per-request counters and histograms are plain Python numbers behind a collector that turns them into
Prometheus families at scrape time: prometheus_client's own metrics take a lock per update and walk the
buckets in Python, ~7 µs a request for the nine updates metering makes (bench/README.md). The event loop
is one thread, and /metrics is served on it, so the numbers need no lock.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from app.call import CallRecord, Usage
from app.metering.events import COST_EXPONENT
from app.metering.labels import MetricLabels

COST_UNIT_USD = 10.0**COST_EXPONENT

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _LabelledCounter:
    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        self.name, self.documentation, self.labels = name, documentation, labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, key: tuple[str, ...], amount: float = 1.0) -> None:
        self.values[key] = self.values.get(key, 0.0) + amount

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, value in self.values.items():
            family.add_metric(key, value)
        return family


class _LabelledHistogram:
    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        self.name, self.documentation, self.labels = name, documentation, labels
        # per label set: [count per bucket (the last one +Inf)], sum
        self.values: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def observe(self, key: tuple[str, ...], seconds: float) -> None:
        entry = self.values.get(key)
        if entry is None:
            entry = self.values[key] = ([0] * (len(_LATENCY_BUCKETS) + 1), [0.0])
        entry[0][bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        entry[1][0] += seconds

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, (counts, total) in self.values.items():
            cumulative, buckets = 0, []
            for bound, count in zip((*map(str, _LATENCY_BUCKETS), "+Inf"), counts, strict=True):
                cumulative += count
                buckets.append((bound, float(cumulative)))
            family.add_metric(key, buckets, total[0])
        return family


class _UsageTotals:
    """Tokens by kind and cost, per (model, feature): one dict lookup a call, expanded into the
    gateway_tokens and gateway_cost_usd families at scrape time."""

    _KINDS = ("prompt", "completion", "cached", "reasoning")

    def __init__(self) -> None:
        # per (model, feature): [prompt, completion, cached, reasoning tokens], cost in USD or None
        self.values: dict[tuple[str, str], tuple[list[int], list[float | None]]] = {}

    def add(self, key: tuple[str, str], usage: Usage, cost_units: int | None) -> None:
        entry = self.values.get(key)
        if entry is None:
            entry = self.values[key] = ([0, 0, 0, 0], [None])
        counts = entry[0]
        counts[0] += usage.prompt_tokens
        counts[1] += usage.completion_tokens
        counts[2] += usage.cached_tokens
        counts[3] += usage.reasoning_tokens
        if cost_units is not None:
            entry[1][0] = (entry[1][0] or 0.0) + cost_units * COST_UNIT_USD

    def families(self) -> Iterator[Metric]:
        tokens = CounterMetricFamily(
            "gateway_tokens", "Tokens by model, feature and kind", labels=("model", "feature", "kind")
        )
        cost = CounterMetricFamily(
            "gateway_cost_usd", "Cost in USD by model and feature", labels=("model", "feature")
        )
        for (model, feature), (counts, (usd,)) in self.values.items():
            for kind, count in zip(self._KINDS, counts, strict=True):
                if count:
                    tokens.add_metric((model, feature, kind), count)
            if usd is not None:
                cost.add_metric((model, feature), usd)
        yield tokens
        yield cost


class _Collected(Collector):
    def __init__(self, read: Callable[[], Iterator[Metric]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        return self._read()


class Metrics:
    def __init__(self, max_features: int = 100) -> None:
        # Feature, model and route labels come from clients: bounded (app/metering/labels.py).
        self.labels = MetricLabels(max_features)
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = _LabelledCounter(
            "gateway_requests", "Requests by route and status", ("route", "status")
        )
        self.latency = _LabelledHistogram(
            "gateway_request_duration_seconds", "Time to the end of the response", ("route",)
        )
        self.ttfb = _LabelledHistogram(
            "gateway_time_to_first_byte_seconds", "Time to the first byte of the answer", ("route",)
        )
        self.attempts = _LabelledCounter("gateway_upstream_attempts", "Upstream attempts", ("route",))
        self.usage = _UsageTotals()
        self.unknown_models = _LabelledCounter(
            "gateway_unknown_model_calls", "Calls to a model with no known price", ("model",)
        )
        metrics = (
            self.requests,
            self.latency,
            self.ttfb,
            self.attempts,
            self.unknown_models,
        )
        self.registry.register(_Collected(lambda: (metric.family() for metric in metrics)))
        self.registry.register(_Collected(self.usage.families))

    def watch_recorder(self, read: Callable[[], dict[str, float]]) -> None:
        """Read at scrape time, so the request path never updates these."""

        def families() -> Iterator[Metric]:
            stats = read()
            for name, help_text, key in (
                ("gateway_recorder_queue_depth", "Usage events waiting to be written", "queue_depth"),
                ("gateway_recorder_spool_events", "Usage events in the local spool file", "spool_events"),
                ("gateway_recorder_spool_bytes", "Size of the local spool file", "spool_bytes"),
            ):
                yield GaugeMetricFamily(name, help_text, value=stats.get(key, 0))
            for name, help_text, key in (
                ("gateway_recorder_db_write_errors", "Failed usage writes to the database", "write_errors"),
                ("gateway_recorder_events_written", "Usage events written to the database", "events_written"),
                (
                    "gateway_recorder_events_rejected",
                    "Usage events the database refused, kept in the spool's rejected file",
                    "events_rejected",
                ),
            ):
                yield CounterMetricFamily(name, help_text, value=stats.get(key, 0))

        self.registry.register(_Collected(families))

    def watch_limits(self, read: Callable[[], dict[str, float]]) -> None:
        def families() -> Iterator[Metric]:
            stats = read()
            yield GaugeMetricFamily(
                "gateway_limits_degraded",
                "1 while Redis is unreachable and limits fall back to their fail mode",
                value=stats.get("degraded", 0),
            )
            yield CounterMetricFamily(
                "gateway_limits_redis_errors",
                "Failed Redis calls for limits and budgets",
                value=stats.get("errors", 0),
            )

        self.registry.register(_Collected(families))

    def watch_batches(self, read: Callable[[], dict[str, float]]) -> None:
        """Batch metering (app/metering/batches.py), read at scrape time."""

        def families() -> Iterator[Metric]:
            stats = read()
            yield GaugeMetricFamily(
                "gateway_batches_pending",
                "Batches created or found ended, waiting in memory for the batch metering task",
                value=stats.get("pending", 0),
            )
            yield CounterMetricFamily(
                "gateway_batch_lines_metered",
                "Batch output and error lines this process wrote usage rows for",
                value=stats.get("lines_metered", 0),
            )
            yield CounterMetricFamily(
                "gateway_batch_metering_errors",
                "Batch metering rounds that failed (database or upstream unavailable)",
                value=stats.get("errors", 0),
            )

        self.registry.register(_Collected(families))

    def observe_request(self, route: str, call: CallRecord, seconds: float) -> None:
        route = self.labels.route(route)
        key = (route,)
        self.requests.inc((route, str(call.status_code)))
        self.latency.observe(key, seconds)
        if call.ttfb_s is not None:
            self.ttfb.observe(key, call.ttfb_s)
        if call.attempts:
            self.attempts.inc(key, call.attempts)

    def observe_usage(self, model: str, feature: str, usage: Usage, cost_units: int | None) -> None:
        labels = self.labels
        self.usage.add((labels.model(model), labels.feature(feature)), usage, cost_units)

    def observe_unknown_model(self, model: str) -> None:
        self.unknown_models.inc((self.labels.model(model),))

    def render(self) -> bytes:
        return generate_latest(self.registry)
