"""A reconciliation run (`llm-gateway reconcile`), and the background job that repeats it in the gateway
when OPENAI_ADMIN_KEY is set, exposing the latest complete day's differences as metrics.

Every worker and replica runs the job, but only one whose last stored read is older than the interval
reads OpenAI again (the others find it fresh in the database); they all refresh their metrics from the
view. Two that read at once store the same days twice over: a replace, not a double count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.reconcile.provider import Filters, OrganizationReader, ProviderError
from app.reconcile.store import last_fetch, latest_complete_day, relative, replace_days
from app.upstream import UpstreamClient

log = logging.getLogger("gateway.reconcile")

_MEASURES = (
    ("requests", "openai_requests", "gateway_requests"),
    ("input_tokens", "openai_input_tokens", "gateway_input_tokens"),
    ("output_tokens", "openai_output_tokens", "gateway_output_tokens"),
    ("cost", "openai_cost_usd", "gateway_cost_usd"),
)


def organization_reader(settings: Settings, upstream: UpstreamClient) -> OrganizationReader:
    if settings.openai_admin_key is None:
        raise ProviderError("OPENAI_ADMIN_KEY is not set: OpenAI's usage needs an organization admin key")
    return OrganizationReader(
        upstream,
        settings.openai_base_url,
        settings.openai_admin_key.get_secret_value(),
        Filters.parse(settings.reconcile_project_ids, settings.reconcile_api_key_ids),
    )


async def reconcile(
    engine: AsyncEngine, reader: OrganizationReader, start: date, end: date, timeout_s: float
) -> int:
    """Read OpenAI's numbers for the UTC days [start, end) and store them; the rows stored."""
    fetched_at = datetime.now(UTC)
    try:
        async with asyncio.timeout(timeout_s):
            rows = await reader.read(start, end)
    except TimeoutError:
        raise ProviderError(f"OpenAI's usage was not read within {timeout_s:g} s") from None
    await replace_days(engine, start, end, rows, fetched_at)
    return len(rows)


class _Families(Collector):
    def __init__(self, job: Reconciler) -> None:
        self._job = job

    def collect(self) -> Iterator[Metric]:
        return self._job.families()


class Reconciler:
    def __init__(
        self, settings: Settings, upstream: UpstreamClient, engine: AsyncEngine, registry: CollectorRegistry
    ) -> None:
        self._reader = organization_reader(settings, upstream)
        self._engine = engine
        self._interval_s = settings.reconcile_interval_s
        self._days = settings.reconcile_days
        self._timeout_s = settings.reconcile_timeout_s
        self._latest: dict[str, Any] | None = None
        self._last_success: float | None = None
        self._errors = 0
        self._task: asyncio.Task[None] | None = None
        registry.register(_Families(self))

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="reconcile")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception as exc:  # the next run tries again; the metric counts the failures
                self._errors += 1
                detail = str(exc) if isinstance(exc, ProviderError) else type(exc).__name__
                log.warning("reconciliation with OpenAI's usage failed", extra={"reason": detail})
            await asyncio.sleep(self._interval_s)

    async def run_once(self) -> None:
        now = datetime.now(UTC)
        fetched = await last_fetch(self._engine)
        if fetched is None or now - fetched >= timedelta(seconds=self._interval_s):
            today = now.date()
            start = today - timedelta(days=self._days - 1)
            await reconcile(self._engine, self._reader, start, today + timedelta(days=1), self._timeout_s)
        self._latest = await latest_complete_day(self._engine)
        self._last_success = time.time()

    def families(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "gateway_reconciliation_errors",
            "Failed runs of the reconciliation with OpenAI's usage",
            value=self._errors,
        )
        if self._last_success is not None:
            yield GaugeMetricFamily(
                "gateway_reconciliation_last_success_timestamp_seconds",
                "When this process last ran the reconciliation without an error",
                value=self._last_success,
            )
        latest = self._latest
        if latest is None:
            return
        day: date = latest["day"]
        yield GaugeMetricFamily(
            "gateway_reconciliation_day_timestamp_seconds",
            "Start of the UTC day the reconciliation_relative_difference gauges describe",
            value=datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp(),
        )
        gauge = GaugeMetricFamily(
            "gateway_reconciliation_relative_difference",
            "(OpenAI - gateway) / OpenAI on the latest complete day that was read",
            labels=("measure",),
        )
        for measure, openai, gateway in _MEASURES:
            gauge.add_metric((measure,), relative(float(latest[openai]), float(latest[gateway])))
        yield gauge
