"""Metering at the end of a response — finished, failed, or abandoned by the client mid-stream: ONE
usage event to the recorder, the request's metrics, the limits settled. The request context (the
outermost middleware) calls `meter_call` in its `finally`; one layer less on every request than a
middleware of its own.

Nothing here awaits: on a client disconnect the request task may already be cancelled, and anything
awaited in a `finally` would be cancelled with it (ARCHITECTURE.md, pitfall 2). `Recorder.submit` is a
`put_nowait`.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from starlette.types import Scope

from app.call import CallRecord
from app.limits.guard import Guard
from app.metering.events import cost_to_usd
from app.metering.metrics import Metrics
from app.metering.pricing import PriceTable
from app.metering.usage import event_line, usage_of

log = logging.getLogger("gateway.metering")


class EventSink(Protocol):
    def submit(self, line: bytes) -> None: ...


class Meter:
    """What metering needs at the end of a response; made in the lifespan. Without a recorder
    (GATEWAY_METERING=false) there are no usage events, but requests are still counted in /metrics and
    the limits still settle what they reserved."""

    def __init__(
        self, recorder: EventSink | None, prices: PriceTable, metrics: Metrics, guard: Guard
    ) -> None:
        self.recorder = recorder
        self.prices = prices
        self.metrics = metrics
        self.guard = guard

    def finish(self, scope: Scope, call: CallRecord) -> None:
        route = call.route or call.endpoint or getattr(scope.get("route"), "path", None) or "unmatched"
        elapsed = time.perf_counter() - call.started
        self.metrics.observe_request(route, call, elapsed)
        if call.endpoint is None or (call.metered_only_with_usage and call.usage is None):
            return
        if self.recorder is None and call.admission is None:
            return
        usage, source = usage_of(call)
        # Priced by the model that answered (a dated snapshot resolves to its family).
        model = call.upstream_model or call.routed_model or call.model
        cost = self.prices.cost_units(
            model, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens
        )
        if call.admission is not None:
            self.guard.settle(call.admission, usage.total_tokens, cost_to_usd(cost))
        if self.recorder is not None:
            self.metrics.observe_usage(model or "", call.feature or "", usage, cost)
            self.recorder.submit(event_line(call, usage, source, cost, elapsed))


def meter_call(scope: Scope, call: CallRecord) -> None:
    """Called by the request context once the response has ended — finished, failed, or abandoned by
    the client mid-stream: ONE usage event for the call."""
    meter: Meter | None = getattr(scope["app"].state, "meter", None)
    if meter is None:
        return
    try:
        meter.finish(scope, call)
    except Exception:  # metering must never turn a served response into an error
        log.exception("metering failed")
