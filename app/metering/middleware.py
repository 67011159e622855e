"""Metering at the end of a response — finished, failed, or abandoned by the client mid-stream: ONE
usage event to the recorder, the request's metrics, the limits settled. The request context (the
outermost middleware) calls `meter_call` in its `finally`; one layer less on every request than a
middleware of its own.

Nothing here awaits: on a client disconnect the request task may already be cancelled, and anything
awaited in a `finally` would be cancelled with it. `Recorder.submit` is a
`put_nowait`. The one exception, the first call a process must count with a tokenizer it has not built
yet, is metered by a task of its own, not the request's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

from starlette.types import Scope

from app.call.admission import Admission
from app.call.record import CallRecord
from app.metering import tokens
from app.metering.metrics import Metrics
from app.metering.pricing import PriceTable, rate_tier
from app.metering.usage import UPSTREAM, estimated_with, event_line, usage_of

log = logging.getLogger("gateway.metering")


class EventSink(Protocol):
    def submit(self, line: bytes) -> None: ...


class PricesInForce(Protocol):
    """The owner of the prices (`app.live_config.ConfigHolder`), handed in by the lifespan."""

    def prices_for(self, scope: Scope) -> PriceTable: ...


class Settlement(Protocol):
    """The limits' end of a call (`app.limits.guard.Guard`, handed in by the lifespan): what its admission
    holds is settled at what the call cost, or let go when there is nothing to meter."""

    def settle(self, admission: Admission, total_tokens: int, cost_units: int | None) -> None: ...

    def release(self, admission: Admission) -> None: ...


class Meter:
    """What metering needs at the end of a response; made in the lifespan. Without a recorder
    (GATEWAY_METERING=false) there are no usage events, but requests are still counted in /metrics and
    the limits still settle what they reserved."""

    def __init__(
        self, recorder: EventSink | None, config: PricesInForce, metrics: Metrics, guard: Settlement
    ) -> None:
        self.recorder = recorder
        self.config = config
        self.metrics = metrics
        self.guard = guard
        self._building: set[asyncio.Task[None]] = set()

    def finish(self, scope: Scope, call: CallRecord) -> None:
        admitted, outcome = call.admitted, call.outcome
        route = call.route or admitted.endpoint or getattr(scope.get("route"), "path", None) or "unmatched"
        elapsed = time.perf_counter() - call.started
        self.metrics.observe_request(route, call, elapsed)
        if admitted.endpoint is None or (admitted.metered_only_with_usage and outcome.usage is None):
            # Nothing to meter: what the call's budgets hold for it goes all the same.
            if admitted.admission is not None:
                self.guard.release(admitted.admission)
            return
        if self.recorder is None and admitted.admission is None:
            return
        prices = self.config.prices_for(scope)
        # An answer with its usage (nearly every call) needs no tokenizer.
        if outcome.usage is None:
            model = estimated_with(call)
            if model is not None and not tokens.is_built_for(model):
                self._build_then_record(call, prices, model, elapsed)
                return
        self._record(call, prices, elapsed)

    def _build_then_record(self, call: CallRecord, prices: PriceTable, model: str, elapsed: float) -> None:
        """The first call this process must count itself with a tokenizer not built yet. Tokenizers are
        built on demand, not at start-up: one costs ~25-50 MB for the life of the process (of a gateway
        using ~115 MB) and ~0.3 s of CPU, and OpenAI's answers carry their usage, so most processes never
        need one. Built off the event loop; the call is metered once it is."""

        async def build_then_record() -> None:
            # A tokenizer that fails to build leaves the counting to fail too: a row with zero tokens.
            with contextlib.suppress(Exception):
                await asyncio.to_thread(tokens.encoding_for_model, model)
            try:
                self._record(call, prices, elapsed)
            except Exception:
                log.exception("metering failed")

        task = call.outcome.pending_metering = asyncio.get_running_loop().create_task(build_then_record())
        self._building.add(task)
        task.add_done_callback(self._building.discard)

    async def drain(self, timeout_s: float) -> None:
        """At shutdown, before the recorder closes: the calls waiting for a tokenizer are recorded."""
        if self._building:
            await asyncio.wait(set(self._building), timeout=timeout_s)

    def _record(self, call: CallRecord, prices: PriceTable, elapsed: float) -> None:
        admitted, outcome = call.admitted, call.outcome
        usage, source = outcome.usage, UPSTREAM
        if usage is None:
            usage, source = usage_of(call)
        # Priced by the model that answered (a dated snapshot resolves to its family), at the rates of the
        # service tier its answer reported.
        model = outcome.upstream_model or outcome.routed_model or admitted.model
        priced = prices.price_usage(model, rate_tier(outcome.service_tier), usage)
        cost = priced.cost_units
        outcome.metered_usage, outcome.cost_units = usage, cost
        if admitted.admission is not None:
            self.guard.settle(admitted.admission, usage.total_tokens, cost)
        if self.recorder is not None:
            self.metrics.observe_usage(admitted.model or "", model or "", admitted.feature or "", usage, cost)
            self.recorder.submit(event_line(call, usage, source, priced, outcome.service_tier, elapsed))


def meter_call(meter: Meter, scope: Scope, call: CallRecord) -> None:
    """Called by the request context once the response has ended — finished, failed, or abandoned by
    the client mid-stream: ONE usage event for the call."""
    try:
        meter.finish(scope, call)
    except Exception:  # metering must never turn a served response into an error
        log.exception("metering failed")
