"""Admission of one call against the rate limits and budgets of its key, feature and end user, and the
settling of what it really cost once it has ended.

Token estimate before the call: the prompt (counted exactly when a prompt budget already counted it,
otherwise estimated from the body's bytes, `estimate.prompt_tokens`) plus the completion the caller
allows (`max_tokens`, `max_completion_tokens` or `max_output_tokens`). The estimate reserves
tokens-per-minute; the settle step corrects it to the real count.

Budgets reserve the call's worst case: that prompt plus the most output it may produce (its own output
cap, or the default one of its feature, its model or the gateway, times `n`), at the model's price. The
settle step, which runs however the call ends, lets go of that hold and charges the real cost to each
scope's day and month.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Coroutine
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from redis.asyncio import Redis
from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.call.admission import Admission, Limit, Reservation
from app.call.record import CallRecord
from app.config_file import Caps, GatewayConfig
from app.db.models import api_keys, usage_daily, usage_events
from app.errors import GatewayError
from app.limits.budgets import (
    Budget,
    BudgetLedger,
    InProcessBudgetLedger,
    OverBudget,
    Period,
    period_key,
    to_usd,
)
from app.limits.ratelimit import Denied, InProcessRateLimiter, RateLimiter
from app.metering.pricing import PriceTable
from app.money import usd

log = logging.getLogger("gateway.limits")


def completion_allowance(body: dict[str, Any]) -> int:
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = _positive(body.get(name))
        if value:
            return value
    return 0


def worst_case_output(body: dict[str, Any], config: GatewayConfig, feature: str | None, model: str) -> int:
    """The most output tokens the call may be billed for: its own cap, else the default cap of its
    feature, of its model, or of the gateway; times the choices it asks for (`n`)."""
    cap = completion_allowance(body)
    if not cap:
        rules = config.features.get(feature) if feature is not None else None
        limits = config.limits
        cap = (
            (rules.default_max_output_tokens if rules is not None else None)
            or limits.default_max_output_tokens_by_model.get(model)
            or limits.default_max_output_tokens
        )
    return cap * (_positive(body.get("n")) or 1)


def _positive(value: object) -> int:
    # type() rather than isinstance(): True is an int too, and not a count.
    return value if type(value) is int and value > 0 else 0


_NO_CAPS = Caps()


def _periods(caps: Caps) -> tuple[tuple[Period, Decimal | None], ...]:
    return (("day", caps.budget_daily_usd), ("month", caps.budget_monthly_usd))


def _budgets(caps: list[tuple[str, Caps]]) -> list[Budget]:
    return [Budget(scope, period, cap) for scope, c in caps for period, cap in _periods(c) if cap is not None]


def _unpriced() -> Decimal:
    # An exhausted budget refuses even a call estimated at zero (BudgetLedger.check).
    return Decimal(0)


class Guard:
    def __init__(
        self,
        limiter: RateLimiter,
        ledger: BudgetLedger,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        reservation_ttl_s: float,
        shared_redis: Redis | None = None,
    ) -> None:
        self.limiter = limiter
        self.ledger = ledger
        # The client the limiter and the ledger share, closed after them.
        self._shared_redis = shared_redis
        self.clock = clock
        self.reservation_ttl_s = reservation_ttl_s
        self._pending: set[asyncio.Task[None]] = set()
        # Limits and budgets kept in this process have nothing to wait for: a call settles on the spot,
        # not in a task of its own (~5 us a call).
        self._on_the_spot = (
            (limiter, ledger)
            if isinstance(limiter, InProcessRateLimiter) and isinstance(ledger, InProcessBudgetLedger)
            else None
        )

    @staticmethod
    def concerns(call: CallRecord) -> bool:
        """Whether any key, feature or user scope applies (admit() would return None otherwise): checked
        first, so a call without one does not pay for a coroutine."""
        who = call.admitted
        return who.key is not None or who.feature is not None or who.user_id is not None

    def _caps(self, call: CallRecord, config: GatewayConfig) -> list[tuple[str, Caps]]:
        admitted = call.admitted
        caps: list[tuple[str, Caps]] = []
        key = admitted.key
        if key is not None:
            caps.append(
                (
                    f"key:{key.id}",
                    # Validated when the key was stored; built per call, so without validating again.
                    Caps.model_construct(
                        rpm=key.rpm_limit,
                        tpm=key.tpm_limit,
                        budget_daily_usd=key.budget_daily_usd,
                        budget_monthly_usd=key.budget_monthly_usd,
                    ),
                )
            )
        token = admitted.browser_token
        if token is not None and (token.rpm_limit is not None or token.budget_usd is not None):
            # A token lives an hour at most: its day's budget is its whole budget (unless it spans
            # midnight UTC).
            caps.append(
                (
                    f"token:{token.id}",
                    Caps.model_construct(rpm=token.rpm_limit, budget_daily_usd=token.budget_usd),
                )
            )
        if admitted.feature is not None:
            caps.append((f"feature:{admitted.feature}", config.features.get(admitted.feature) or _NO_CAPS))
        if admitted.user_id is not None:
            caps.append((f"user:{admitted.user_id}", config.users))
        return caps

    def admit(
        self,
        call: CallRecord,
        config: GatewayConfig,
        prices: PriceTable,
        model: str,
        sizes: Callable[[], tuple[int, int, int]],
    ) -> Coroutine[None, None, Admission | None]:
        """None when no limit or budget concerns the call (nothing to settle after it). `sizes` gives the
        call's prompt tokens, the completion tokens it asks for and the most it may be billed for; rate
        limits reserve the first two, budgets the cost of the first and the last (nothing for a model
        without a price: its calls cost nothing the budgets could count). It is asked only when a rate
        limit or a budget applies: a call whose scopes have neither estimates nothing."""

        def estimate() -> tuple[int, Callable[[], Decimal]]:
            prompt, completion, worst = sizes()
            return prompt + completion, lambda: prices.cost_usd(model, prompt, worst, 0) or Decimal(0)

        # The coroutine itself, not one awaiting it: a frame less on every limited call.
        return self._admit(call, config, estimate)

    def admit_unpriced(
        self, call: CallRecord, config: GatewayConfig, *, spends: bool
    ) -> Coroutine[None, None, Admission | None]:
        """A call priced only once it is made, if ever (passthrough, model lists, retrievals): one request
        against every rate limit, no tokens reserved; refused by a spent budget only when it `spends`."""
        return self._admit(call, config, lambda: (0, _unpriced if spends else None))

    async def _admit(
        self,
        call: CallRecord,
        config: GatewayConfig,
        estimate: Callable[[], tuple[int, Callable[[], Decimal] | None]],
    ) -> Admission | None:
        caps = self._caps(call, config)
        if not caps:
            return None
        limits = tuple(Limit(scope, c.rpm, c.tpm) for scope, c in caps if c.rpm or c.tpm)
        budgets = _budgets(caps)
        scopes = tuple(scope for scope, _ in caps)
        if not limits and not budgets:
            # Nothing to count or hold now; its cost is still charged to its scopes once it is known, so
            # that a budget set later for one of them starts from what it has spent.
            return Admission((), scopes, 0)
        tokens, cost = estimate()
        now = self.clock()
        reservation: Reservation | None = None
        if budgets and cost is not None:
            verdict = await self.ledger.reserve(budgets, cost(), self.reservation_ttl_s, now)
            if isinstance(verdict, OverBudget):
                raise _over_budget(verdict, now)
            reservation = verdict
        admission = Admission(limits, scopes, tokens, reservation)
        if limits:
            try:
                denied = await self.limiter.admit(limits, tokens, now.timestamp())
            except BaseException:
                self.release(admission)
                raise
            if denied is not None:
                self.release(admission)
                raise _rate_limited(denied)
        return admission

    async def hold(self, call: CallRecord, config: GatewayConfig, cost: Decimal) -> Admission | None:
        """For a call admitted before its body was read (admit_unpriced), once its worst-case `cost` is
        known: held against its budgets as admit() would have held it, or refused with the same 429.
        Returns the call's admission with the hold in place of its own (which held nothing), for the
        route to keep, so the call's settle lets go of it."""
        admission = call.admitted.admission
        if admission is None or not cost:
            return admission
        budgets = _budgets(self._caps(call, config))
        if not budgets:
            return admission
        now = self.clock()
        verdict = await self.ledger.reserve(budgets, cost, self.reservation_ttl_s, now)
        if isinstance(verdict, OverBudget):
            raise _over_budget(verdict, now)
        return admission if verdict is None else replace(admission, reservation=verdict)

    def settle(self, admission: Admission, total_tokens: int, cost_units: int | None) -> None:
        """After the call, however it ended: correct the token reservation, let go of the budgets' hold
        and charge the cost (in units of 1e-10 USD, as usage events carry it), off the request path (the
        request task may be cancelled by now, on a client disconnect, and an await in it with the task)."""
        held = admission.reservation is not None and admission.reservation.units > 0
        if not held and not cost_units and (not admission.limits or total_tokens == admission.token_estimate):
            return
        if self._on_the_spot is not None:
            limiter, ledger = self._on_the_spot
            try:
                now = self.clock()
                delta, charge = _settlement(admission, total_tokens, cost_units)
                if delta:
                    limiter.settle_now(admission.limits, delta, now.timestamp())
                if charge is not None:
                    ledger.settle_now(admission.scopes, charge, admission.reservation, now)
            except Exception:  # as in _settle: never the call's failure
                log.warning("settling limits failed", exc_info=True)
            return
        task = asyncio.get_running_loop().create_task(self._settle(admission, total_tokens, cost_units))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def release(self, admission: Admission) -> None:
        """A call that ends without a cost to charge (it was never made, or another call is metered for
        it): its budgets' hold goes, its token reservation stays as estimated."""
        self.settle(admission, admission.token_estimate, None)

    async def _settle(self, admission: Admission, total_tokens: int, cost_units: int | None) -> None:
        try:
            now = self.clock()
            delta, charge = _settlement(admission, total_tokens, cost_units)
            if delta:
                await self.limiter.settle(admission.limits, delta, now.timestamp())
            if charge is not None:
                await self.ledger.settle(admission.scopes, to_usd(charge), admission.reservation, now)
        except Exception:  # a lost settle skews one counter for a minute or a period; never the call
            log.warning("settling limits failed", exc_info=True)

    def stats(self) -> dict[str, float]:
        return {
            "degraded": float(self.limiter.degraded or self.ledger.degraded),
            "errors": self.limiter.redis_errors + self.ledger.redis_errors,
        }

    async def drain(self) -> None:
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=5)

    async def close(self) -> None:
        await self.drain()
        await self.limiter.aclose()
        await self.ledger.aclose()
        if self._shared_redis is not None:
            await self._shared_redis.aclose()


def _settlement(admission: Admission, total_tokens: int, cost_units: int | None) -> tuple[int, int | None]:
    """What a call's settle does: the tokens to add to its rate limits (or give back), and the units to
    charge to its budgets, letting go of their hold (None: no budget to touch)."""
    delta = total_tokens - admission.token_estimate if admission.limits else 0
    charges = bool(admission.scopes) and (bool(cost_units) or admission.reservation is not None)
    return delta, (cost_units or 0) if charges else None


def _money(value: Decimal) -> str:
    return f"${usd(value)}"


def _describe(scope: str) -> str:
    kind, _, name = scope.partition(":")
    return {
        "key": f"key '{name}'",
        "feature": f"feature '{name}'",
        "user": f"user '{name}'",
        "token": f"browser token '{name}'",
    }.get(kind, scope)


def _over_budget(over: OverBudget, now: datetime) -> GatewayError:
    budget = over.budget
    if over.reason == "ledger_unavailable":
        return GatewayError(
            503, "Budgets cannot be checked right now; try again shortly.", code="budget_unavailable"
        )
    wait = max(1, math.ceil((over.resets_at - now).total_seconds()))
    period = "daily" if budget.period == "day" else "monthly"
    resets = over.resets_at.isoformat().replace("+00:00", "Z")
    held = f", {_money(over.reserved_usd)} held by calls in flight" if over.reserved_usd else ""
    return GatewayError(
        429,
        f"The {period} budget of {_money(budget.cap_usd)} for {_describe(budget.scope)} is spent "
        f"({_money(over.spent_usd)} so far{held}); it resets at {resets}.",
        code="budget_exceeded",
        # Waiting seconds will not help: the SDKs must not retry this.
        headers={"retry-after": str(wait), "x-should-retry": "false"},
    )


def _rate_limited(denied: Denied) -> GatewayError:
    if denied.reason == "limiter_unavailable":
        return GatewayError(
            503,
            "Rate limits cannot be checked right now; try again shortly.",
            code="rate_limiter_unavailable",
        )
    unit = "requests" if denied.kind == "requests" else "tokens"
    header = denied.retry_after_header
    if header is None:
        return GatewayError(
            429,
            f"This request alone exceeds the limit of {denied.limit} {unit} per minute for "
            f"{_describe(denied.scope)}.",
            code="rate_limit_exceeded",
            headers={"x-should-retry": "false"},
        )
    return GatewayError(
        429,
        f"Rate limit reached for {_describe(denied.scope)}: {denied.limit} {unit} per minute. "
        f"Try again in {header}s.",
        code="rate_limit_exceeded",
        headers={"retry-after": header},
    )


async def seed_spend(engine: AsyncEngine, ledger: BudgetLedger, now: datetime) -> None:
    """This day's and month's spend per key, feature and user, from the database, for a ledger that
    starts empty (a new process, or Redis after a restart)."""
    month_start = now.date().replace(day=1)
    day_key, month_key = period_key("day", now), period_key("month", now)
    rows: list[tuple[str, str, str, Decimal]] = []
    async with engine.connect() as conn:
        for scope, column in (("feature", usage_daily.c.feature), ("user", usage_daily.c.user_id)):
            result = await conn.execute(
                select(
                    column,
                    func.sum(usage_daily.c.cost_usd),
                    func.sum(usage_daily.c.cost_usd).filter(usage_daily.c.day == now.date()),
                )
                .where(usage_daily.c.day >= month_start, column != "")
                .group_by(column)
            )
            for name, month, day in result:
                rows.append((f"{scope}:{name}", "month", month_key, Decimal(month or 0)))
                rows.append((f"{scope}:{name}", "day", day_key, Decimal(day or 0)))
        start = datetime(month_start.year, month_start.month, 1, tzinfo=UTC)
        today = datetime(now.year, now.month, now.day, tzinfo=UTC)
        # Keys are not in the rollup: sum their events, but only for keys with a cap, each through the
        # (api_key_id, created_at) index, so start-up never scans a month of every key's events. A key
        # given a cap later counts its spend from then until the next start.
        capped = select(api_keys.c.id).where(
            or_(api_keys.c.budget_daily_usd.is_not(None), api_keys.c.budget_monthly_usd.is_not(None))
        )
        result = await conn.execute(
            select(
                usage_events.c.api_key_id,
                func.sum(usage_events.c.cost_usd),
                func.sum(usage_events.c.cost_usd).filter(usage_events.c.created_at >= today),
            )
            .where(usage_events.c.created_at >= start, usage_events.c.api_key_id.in_(capped))
            .group_by(usage_events.c.api_key_id)
        )
        for key_id, month, day in result:
            rows.append((f"key:{key_id}", "month", month_key, Decimal(month or 0)))
            rows.append((f"key:{key_id}", "day", day_key, Decimal(day or 0)))
    await ledger.seed(rows, now)
