"""Prometheus metrics: one registry per app (not the process-global one), filled per request.

The per-request counters and histograms are plain Python numbers behind a collector that turns them into
Prometheus families at scrape time: prometheus_client's own metrics take a lock per update and walk the
buckets in Python, ~7 µs a request for the nine updates metering makes (docs/performance-log.md,
optimisation log). The event loop is one thread, and /metrics is served on it, so the numbers need no
lock.

Several workers (`llm-gateway serve --workers N`): a scrape reaches one of them, and must answer for the
whole server. prometheus_client's multiprocess mode would do it by making every update a write into a
memory-mapped file under a lock; here the request path stays as it is, and each worker publishes its
families to a file of its own in a directory `serve` makes (WORKER_METRICS_DIR) once a second and when
it stops. A scrape publishes its own worker's first, then sums every worker's file: the other workers'
numbers are at most a second old. A worker that has exited keeps its counters in the sums (they must
never go down); its gauges drop out.
"""

from __future__ import annotations

import asyncio
import logging
import os
from bisect import bisect_left
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from app.call.record import CallRecord, Usage
from app.config_file import GatewayConfig
from app.db.events import COST_EXPONENT
from app.metering.labels import MAX_NAMES_REMEMBERED, OTHER, MetricLabels
from app.metering.pricing import PriceTable

COST_UNIT_USD = 10.0**COST_EXPONENT

log = logging.getLogger("gateway.metrics")

# Set by `llm-gateway serve` for its workers when there are several; made and removed by it.
WORKER_METRICS_DIR = "LLM_GATEWAY_WORKER_METRICS_DIR"
PUBLISH_INTERVAL_S = 1.0
# Gauges are summed over the live workers, except these. "max": the server's value is the largest (a
# flag, a moment). "one": every worker reads the same stored numbers, so any one worker's value is the
# server's (a sum would count it once per worker).
_GAUGE_MERGE: dict[str, Literal["max", "one"]] = {
    "gateway_limits_degraded": "max",
    "gateway_reconciliation_last_success_timestamp_seconds": "max",
    "gateway_reconciliation_day_timestamp_seconds": "max",
    "gateway_reconciliation_relative_difference": "one",
}

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


class _Buckets:
    """One histogram's counts per bucket (the last one +Inf) and sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(_LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds

    def buckets(self) -> list[tuple[str, float]]:
        cumulative, buckets = 0, []
        for bound, count in zip((*map(str, _LATENCY_BUCKETS), "+Inf"), self.counts, strict=True):
            cumulative += count
            buckets.append((bound, float(cumulative)))
        return buckets


class _RouteTotals:
    """A route's requests by status, durations, times to the first byte and upstream attempts: one lookup
    a request for all four families, where four counters and histograms took five calls a request."""

    __slots__ = ("attempts", "latency", "statuses", "ttfb")

    def __init__(self) -> None:
        self.statuses: dict[int, int] = {}
        self.latency = _Buckets()
        self.ttfb = _Buckets()
        self.attempts = 0


class _RequestTotals:
    """The per-request families, by route label."""

    def __init__(self, labels: MetricLabels) -> None:
        self._labels = labels
        self.by_label: dict[str, _RouteTotals] = {}
        # Routes as the requests name them, each with its label's totals. A route without a label of its
        # own (`other`) is looked up each time instead: the routes kept are as bounded as the labels.
        self._by_route: dict[str, _RouteTotals] = {}

    def of(self, route: str) -> _RouteTotals:
        totals = self._by_route.get(route)
        if totals is None:
            label = self._labels.route(route)
            totals = self.by_label.get(label)
            if totals is None:
                totals = self.by_label[label] = _RouteTotals()
            if label != OTHER:
                self._by_route[route] = totals
        return totals

    def families(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "gateway_requests", "Requests by route and status", labels=("route", "status")
        )
        latency = HistogramMetricFamily(
            "gateway_request_duration_seconds", "Time to the end of the response", labels=("route",)
        )
        ttfb = HistogramMetricFamily(
            "gateway_time_to_first_byte_seconds", "Time to the first byte of the answer", labels=("route",)
        )
        attempts = CounterMetricFamily("gateway_upstream_attempts", "Upstream attempts", labels=("route",))
        for label, totals in self.by_label.items():
            for status, count in totals.statuses.items():
                requests.add_metric((label, str(status)), count)
            latency.add_metric((label,), totals.latency.buckets(), totals.latency.sum)
            if any(totals.ttfb.counts):
                ttfb.add_metric((label,), totals.ttfb.buckets(), totals.ttfb.sum)
            if totals.attempts:
                attempts.add_metric((label,), totals.attempts)
        yield from (requests, latency, ttfb, attempts)


class _UsageSum:
    """One label set's totals: tokens by kind, and the cost in units of 1e-10 USD (exact; None until a
    call was priced)."""

    __slots__ = ("cached", "completion", "cost_units", "prompt", "reasoning")

    def __init__(self) -> None:
        self.prompt = self.completion = self.cached = self.reasoning = 0
        self.cost_units: int | None = None


class _UsageTotals:
    """Tokens by kind and cost, per (model, upstream_model, feature) label: one dict lookup a call, by the
    names the call gives, expanded into the gateway_tokens and gateway_cost_usd families at scrape time."""

    _KINDS = ("prompt", "completion", "cached", "reasoning")

    def __init__(self, labels: MetricLabels) -> None:
        self._labels = labels
        self.values: dict[tuple[str, str, str], _UsageSum] = {}
        # The same sums by the names calls give: a call's names are labelled once, not at every call.
        self._by_name: dict[tuple[str, str, str], _UsageSum] = {}

    def relabel(self) -> None:
        """The labels may have changed (a new configuration): names are labelled again as they come."""
        self._by_name = {}

    def add(
        self, model: str, upstream_model: str, feature: str, usage: Usage, cost_units: int | None
    ) -> None:
        entry = self._by_name.get((model, upstream_model, feature))
        if entry is None:
            entry = self._entry(model, upstream_model, feature)
        entry.prompt += usage.prompt_tokens
        entry.completion += usage.completion_tokens
        entry.cached += usage.cached_tokens
        entry.reasoning += usage.reasoning_tokens
        if cost_units is not None:
            entry.cost_units = (entry.cost_units or 0) + cost_units

    def _entry(self, model: str, upstream_model: str, feature: str) -> _UsageSum:
        key = self._labels.usage_key(model, upstream_model, feature)
        entry = self.values.get(key)
        if entry is None:
            entry = self.values[key] = _UsageSum()
        # Bounded: the names come from clients.
        if len(self._by_name) < MAX_NAMES_REMEMBERED:
            self._by_name[(model, upstream_model, feature)] = entry
        return entry

    def families(self) -> Iterator[Metric]:
        tokens = CounterMetricFamily(
            "gateway_tokens",
            "Tokens by requested model, answering model, feature and kind",
            labels=("model", "upstream_model", "feature", "kind"),
        )
        cost = CounterMetricFamily(
            "gateway_cost_usd",
            "Cost in USD by requested model, answering model and feature",
            labels=("model", "upstream_model", "feature"),
        )
        for (model, upstream_model, feature), entry in self.values.items():
            counts = (entry.prompt, entry.completion, entry.cached, entry.reasoning)
            for kind, count in zip(self._KINDS, counts, strict=True):
                if count:
                    tokens.add_metric((model, upstream_model, feature, kind), count)
            if entry.cost_units is not None:
                cost.add_metric((model, upstream_model, feature), entry.cost_units * COST_UNIT_USD)
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
        self.requests = _RequestTotals(self.labels)
        self.usage = _UsageTotals(self.labels)
        self.unknown_models = _LabelledCounter(
            "gateway_unknown_model_calls", "Calls to a model with no known price", ("model",)
        )
        self.registry.register(_Collected(self.requests.families))
        self.registry.register(_Collected(lambda: iter((self.unknown_models.family(),))))
        self.registry.register(_Collected(self.usage.families))
        self._shared: _SharedFamilies | None = None

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
                    "gateway_recorder_events_spooled",
                    "Usage events written to the local spool: in an outage, or copied there from slow writes",
                    "events_spooled",
                ),
                (
                    "gateway_recorder_events_replayed",
                    "Usage events read back from the local spool and written to the database",
                    "events_replayed",
                ),
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
        """Batch metering (app/batches/meter.py), read at scrape time."""

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
        outcome = call.outcome
        totals = self.requests.of(route)
        statuses = totals.statuses
        statuses[outcome.status_code] = statuses.get(outcome.status_code, 0) + 1
        totals.latency.observe(seconds)
        if outcome.ttfb_s is not None:
            totals.ttfb.observe(outcome.ttfb_s)
        totals.attempts += outcome.attempts

    def observe_usage(
        self, model: str, upstream_model: str, feature: str, usage: Usage, cost_units: int | None
    ) -> None:
        """`model` as the client asked for it, as the usage rows have it; `upstream_model` the one that
        answered (after aliases and fallbacks; a dated snapshot counts under its model)."""
        self.usage.add(model, upstream_model, feature, usage, cost_units)

    def configure_labels(self, config: GatewayConfig, prices: PriceTable) -> None:
        """At start-up and on SIGHUP (MetricLabels.configure)."""
        self.labels.configure(config, prices)
        self.usage.relabel()

    def observe_unknown_model(self, model: str) -> None:
        self.unknown_models.inc((self.labels.model(model),))

    def share(self, directory: Path) -> None:
        """This worker is one of several: publish to, and scrape from, `directory`."""
        self._shared = _SharedFamilies(directory, self.registry)

    async def publish_every(self, interval_s: float = PUBLISH_INTERVAL_S) -> None:
        """Run in the lifespan while the worker serves; publishes once more when cancelled."""
        shared = self._shared
        if shared is None:
            return
        try:
            while True:
                await asyncio.sleep(interval_s)
                shared.publish()
        finally:
            shared.publish()

    def render(self) -> bytes:
        if self._shared is None:
            return generate_latest(self.registry)
        self._shared.publish()
        return generate_latest(self._shared.merged)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _SharedFamilies:
    """This worker's families written to `<pid>.json` in the shared directory; all workers' summed."""

    def __init__(self, directory: Path, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._path = directory / f"{os.getpid()}.json"
        self._directory = directory
        self._written = b""
        self._failing = False
        self.merged = CollectorRegistry(auto_describe=False)
        self.merged.register(_Collected(self._merge))

    def publish(self) -> None:
        families = [
            (family.name, family.type, family.documentation, [list(sample[:3]) for sample in family.samples])
            for family in self._registry.collect()
        ]
        data = orjson.dumps(families)
        if data == self._written:
            return
        partial = self._path.with_suffix(".partial")
        try:
            partial.write_bytes(data)
            # Readers see the old file or the new one, never half of one.
            partial.replace(self._path)
        except OSError as exc:  # a full disk, a directory cleaned away: the scrape still answers
            if not self._failing:  # once until it works again, not every second
                log.warning("worker metrics not published", extra={"error": str(exc)})
            self._failing = True
            return
        self._failing = False
        self._written = data

    def _merge(self) -> Iterator[Metric]:
        merged: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
        me = os.getpid()
        for path in sorted(self._directory.glob("*.json")):
            try:
                pid = int(path.stem)
                families = orjson.loads(path.read_bytes())
            except (ValueError, OSError) as exc:
                log.warning("worker metrics file skipped", extra={"file": path.name, "error": str(exc)})
                continue
            live = pid == me or _alive(pid)
            for name, kind, documentation, samples in families:
                if kind == "gauge" and not live:
                    continue
                values = merged.setdefault(name, (kind, documentation, {}))[2]
                merge = _GAUGE_MERGE.get(name) if kind == "gauge" else None
                for sample_name, labels, value in samples:
                    key = (sample_name, tuple(labels.items()))
                    before = values.get(key)
                    if before is None:
                        values[key] = value
                    elif merge is None:
                        values[key] = before + value
                    elif merge == "max":
                        values[key] = max(before, value)
        for name, (kind, documentation, values) in merged.items():
            family = Metric(name, documentation, kind)
            for (sample_name, labels), value in values.items():
                family.add_sample(sample_name, dict(labels), value)
            yield family
