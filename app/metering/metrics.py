"""Prometheus metrics: one registry per app (not the process-global one), filled per request."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from app.call import CallRecord
from app.metering.events import UsageEvent

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _RecorderCollector(Collector):
    """Read at scrape time, so the request path never updates these."""

    def __init__(self, read: Callable[[], dict[str, float]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        stats = self._read()
        yield GaugeMetricFamily(
            "gateway_recorder_queue_depth",
            "Usage events waiting to be written",
            value=stats.get("queue_depth", 0),
        )
        yield GaugeMetricFamily(
            "gateway_recorder_spool_events",
            "Usage events in the local spool file",
            value=stats.get("spool_events", 0),
        )
        yield GaugeMetricFamily(
            "gateway_recorder_spool_bytes", "Size of the local spool file", value=stats.get("spool_bytes", 0)
        )
        yield CounterMetricFamily(
            "gateway_recorder_db_write_errors",
            "Failed usage writes to the database",
            value=stats.get("write_errors", 0),
        )
        yield CounterMetricFamily(
            "gateway_recorder_events_written",
            "Usage events written to the database",
            value=stats.get("events_written", 0),
        )


class _LimitsCollector(Collector):
    def __init__(self, read: Callable[[], dict[str, float]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        stats = self._read()
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


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "gateway_requests", "Requests by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "gateway_request_duration_seconds",
            "Time to the end of the response",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "gateway_time_to_first_byte_seconds",
            "Time to the first byte of the answer",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.attempts = Counter("gateway_upstream_attempts", "Upstream attempts", ["route"], registry=r)
        self.tokens = Counter(
            "gateway_tokens", "Tokens by model, feature and kind", ["model", "feature", "kind"], registry=r
        )
        self.cost = Counter(
            "gateway_cost_usd", "Cost in USD by model and feature", ["model", "feature"], registry=r
        )
        self.unknown_models = Counter(
            "gateway_unknown_model_calls", "Calls to a model with no known price", ["model"], registry=r
        )

        # labels() takes a lock and builds the key on every call; the children are cached here instead.
        self._children: dict[tuple[object, ...], Any] = {}

    def _child(self, metric: MetricWrapperBase, *labels: str) -> Any:
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def watch_recorder(self, read: Callable[[], dict[str, float]]) -> None:
        self.registry.register(_RecorderCollector(read))

    def watch_limits(self, read: Callable[[], dict[str, float]]) -> None:
        self.registry.register(_LimitsCollector(read))

    def observe_request(self, route: str, call: CallRecord, seconds: float) -> None:
        self._child(self.requests, route, str(call.status_code)).inc()
        self._child(self.latency, route).observe(seconds)
        if call.ttfb_s is not None:
            self._child(self.ttfb, route).observe(call.ttfb_s)
        if call.attempts:
            self._child(self.attempts, route).inc(call.attempts)

    def observe_usage(self, event: UsageEvent) -> None:
        model = event.upstream_model or event.model or ""
        feature = event.feature or ""
        counts = (
            ("prompt", event.prompt_tokens),
            ("completion", event.completion_tokens),
            ("cached", event.cached_tokens),
            ("reasoning", event.reasoning_tokens),
        )
        for kind, count in counts:
            if count:
                self._child(self.tokens, model, feature, kind).inc(count)
        if event.cost_usd is not None:
            self._child(self.cost, model, feature).inc(float(event.cost_usd))

    def render(self) -> bytes:
        return generate_latest(self.registry)
