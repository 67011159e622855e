"""Pure ASGI metering middleware: once a response has ended — finished, failed, or abandoned by the
client mid-stream — hand ONE usage event to the recorder.

Nothing here awaits: on a client disconnect the request task may already be cancelled, and anything
awaited in a `finally` would be cancelled with it (ARCHITECTURE.md, pitfall 2). `Recorder.submit` is a
`put_nowait`.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from starlette.types import ASGIApp, Receive, Scope, Send

from app.call import CallRecord, get_call
from app.limits.guard import Guard
from app.metering.events import cost_to_usd
from app.metering.metrics import Metrics
from app.metering.pricing import PriceTable
from app.metering.usage import event_line, usage_of

log = logging.getLogger("gateway.metering")


class EventSink(Protocol):
    def submit(self, line: bytes) -> None: ...


class Meter:
    """What the middleware needs at the end of a response; made in the lifespan. Without a recorder
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


class MeteringMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            call = get_call(scope)
            meter: Meter | None = getattr(scope["app"].state, "meter", None)
            if call is not None and meter is not None:
                try:
                    meter.finish(scope, call)
                except Exception:  # metering must never turn a served response into an error
                    log.exception("metering failed")
