"""Spend caps in USD per key, feature and user, per UTC day and UTC month.

check() runs before a call with its estimated cost and refuses it when spent + estimate > cap, or
when the cap is already reached; charge() adds the real cost afterwards, whatever the budgets. Calls
in flight hold no reservation, so N concurrent calls can each pass check() and overshoot a cap by up
to their N costs: a bounded overshoot, where reservations would have to be released on every failure
path of a call.

Money is counted in integer units of 1e-10 USD: exact in Python and in Redis' 64-bit INCRBY (up to
about $900M per counter). Floats drift, and Lua's doubles lose units above 2**53 (about $900k), so
the Redis check is an MGET compared in Python, and the charge script hands INCRBY its units as a
string.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, Literal, Protocol

from redis.asyncio import Redis

from app.limits import redis_scripts
from app.limits.redis_guard import InProcess, RedisBacked, RedisUnavailable

UNITS_PER_USD = 10**10
# Counters outlive their period by an hour, so a replica whose clock lags a little still finds them.
MARGIN_S = 3600
# seed() runs at start-up, off the request path, and may carry a counter for every user.
SEED_TIMEOUT_S = 5.0
SEED_CHUNK = 1000

Period = Literal["day", "month"]
PERIODS: tuple[Period, Period] = ("day", "month")


@dataclass(frozen=True)
class Budget:
    scope: str  # "key:key_abc", "feature:search", "user:u-1"
    period: Period
    cap_usd: Decimal

    def __post_init__(self) -> None:
        _period(self.period)


@dataclass(frozen=True)
class OverBudget:
    """Why a call was refused. When the ledger is unavailable and fails closed, reason says so, budget
    is the first one checked and spent_usd is 0 (unknown)."""

    budget: Budget
    spent_usd: Decimal
    resets_at: datetime
    reason: Literal["over_budget", "ledger_unavailable"] = "over_budget"


class BudgetLedger(Protocol):
    async def check(
        self, budgets: Sequence[Budget], estimate_usd: Decimal, now: datetime | None = None
    ) -> OverBudget | None:
        """The first budget already spent, or that spent + estimate would exceed; else None."""
        ...

    async def charge(self, scopes: Sequence[str], cost_usd: Decimal, now: datetime | None = None) -> None:
        """Add a call's real cost to the day and month counters of each scope."""
        ...

    async def spent(self, scope: str, period: str, now: datetime | None = None) -> Decimal: ...

    async def seed(self, rows: Iterable[tuple[str, str, str, Decimal]], now: datetime | None = None) -> None:
        """Load (scope, period, period_key, amount) rows of the current periods where no counter exists."""
        ...

    @property
    def degraded(self) -> bool: ...

    @property
    def redis_errors(self) -> int: ...

    async def aclose(self) -> None: ...


def to_units(usd: Decimal) -> int:
    return int((usd * UNITS_PER_USD).to_integral_value(ROUND_HALF_EVEN))


def to_usd(units: int) -> Decimal:
    return Decimal(units).scaleb(-10)


def utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        # A naive time would silently be read as the server's local time, shifting every period.
        raise ValueError("now must be timezone-aware")
    return now.astimezone(UTC)


def period_key(period: str, now: datetime) -> str:
    """The period's name as usage rows group by it: "2026-11-25" for a day, "2026-11" for a month."""
    return now.strftime("%Y-%m-%d" if _period(period) == "day" else "%Y-%m")


def resets_at(period: str, now: datetime) -> datetime:
    """The start of the next period: the next UTC midnight, or the first of next month."""
    if _period(period) == "day":
        return datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
    if now.month == 12:
        return datetime(now.year + 1, 1, 1, tzinfo=UTC)
    return datetime(now.year, now.month + 1, 1, tzinfo=UTC)


def _period(period: str) -> Period:
    for known in PERIODS:
        if period == known:
            return known
    raise ValueError(f"period must be 'day' or 'month', not {period!r}")


def _first_over(
    budgets: Sequence[Budget], spent_units: Sequence[int], estimate_usd: Decimal, now: datetime
) -> OverBudget | None:
    estimate = to_units(estimate_usd)
    for budget, units in zip(budgets, spent_units, strict=True):
        cap = to_units(budget.cap_usd)
        # An exhausted budget refuses even a call estimated at zero: its real cost rarely is.
        if units >= cap or units + estimate > cap:
            return OverBudget(budget, to_usd(units), resets_at(budget.period, now))
    return None


def _current_rows(
    rows: Iterable[tuple[str, str, str, Decimal]], now: datetime
) -> Iterable[tuple[str, Period, int]]:
    """(scope, period, units) of the rows for the periods `now` is in; older rows are spent history."""
    for scope, period, key, amount in rows:
        if key == period_key(period, now):
            yield scope, _period(period), to_units(amount)


class InProcessBudgetLedger(InProcess):
    """Budgets for one process: a single worker, or tests. Keeps only the current periods' counters."""

    def __init__(self) -> None:
        # (scope, period, period_key) -> units
        self._units: dict[tuple[str, str, str], int] = {}
        self._current: dict[str, str] = {}

    async def check(
        self, budgets: Sequence[Budget], estimate_usd: Decimal, now: datetime | None = None
    ) -> OverBudget | None:
        now = utc(now)
        spent = [self._units.get(self._key(b.scope, b.period, now), 0) for b in budgets]
        return _first_over(budgets, spent, estimate_usd, now)

    async def charge(self, scopes: Sequence[str], cost_usd: Decimal, now: datetime | None = None) -> None:
        now = utc(now)
        self._forget_past(now)
        units = to_units(cost_usd)
        # A scope listed twice is still one payer.
        for scope in dict.fromkeys(scopes):
            for period in PERIODS:
                key = self._key(scope, period, now)
                self._units[key] = self._units.get(key, 0) + units

    async def spent(self, scope: str, period: str, now: datetime | None = None) -> Decimal:
        return to_usd(self._units.get(self._key(scope, period, utc(now)), 0))

    async def seed(self, rows: Iterable[tuple[str, str, str, Decimal]], now: datetime | None = None) -> None:
        now = utc(now)
        self._forget_past(now)
        for scope, period, units in _current_rows(rows, now):
            self._units.setdefault(self._key(scope, period, now), units)

    @staticmethod
    def _key(scope: str, period: str, now: datetime) -> tuple[str, str, str]:
        return scope, period, period_key(period, now)

    def _forget_past(self, now: datetime) -> None:
        current: dict[str, str] = {period: period_key(period, now) for period in PERIODS}
        if current != self._current:
            self._units = {k: units for k, units in self._units.items() if k[2] == current[k[1]]}
            self._current = current


class RedisBudgetLedger(RedisBacked):
    """Budgets shared by every worker and replica using the same Redis: one counter per scope and
    period, `{prefix}{scope}:{day|month}:{period_key}`, expiring an hour after its period.

    `redis` is a URL (the ledger then owns its client and closes it in aclose()) or a client from
    redis_guard.redis_client() shared with the rate limiter (closed by whoever made it).
    """

    WHAT = "budgets"
    PREFIX = "gw:budget:"

    def __init__(self, redis: str | Redis, **options: Any) -> None:
        super().__init__(redis, **options)
        self._charge = self._redis.register_script(redis_scripts.CHARGE)

    async def check(
        self, budgets: Sequence[Budget], estimate_usd: Decimal, now: datetime | None = None
    ) -> OverBudget | None:
        if not budgets:
            return None
        now = utc(now)
        keys = [self._key(b.scope, b.period, now) for b in budgets]
        try:
            values = await self._guard.call(lambda: self._redis.mget(keys))
        except RedisUnavailable:
            if self._guard.fail_open:
                return None
            first = budgets[0]
            return OverBudget(first, Decimal(0), resets_at(first.period, now), "ledger_unavailable")
        return _first_over(budgets, [int(v or 0) for v in values], estimate_usd, now)

    async def charge(self, scopes: Sequence[str], cost_usd: Decimal, now: datetime | None = None) -> None:
        units = to_units(cost_usd)
        if not scopes or units == 0:
            return
        now = utc(now)
        keys: list[str] = []
        ttls: list[int] = []
        # A scope listed twice is still one payer.
        for scope in dict.fromkeys(scopes):
            for period in PERIODS:
                keys.append(self._key(scope, period, now))
                ttls.append(_ttl(period, now))
        # Nothing to refuse after the call. A charge lost here leaves the counters short by its cost
        # for the rest of the period (counted in unchecked); the usage row stays the record of spend.
        with contextlib.suppress(RedisUnavailable):
            await self._guard.call(lambda: self._charge(keys=keys, args=[str(units), *ttls]))

    async def spent(self, scope: str, period: str, now: datetime | None = None) -> Decimal:
        """Raises RedisUnavailable rather than report an unknown spend as zero."""
        key = self._key(scope, period, utc(now))
        value = await self._guard.call(lambda: self._redis.get(key))
        return to_usd(int(value or 0))

    async def seed(self, rows: Iterable[tuple[str, str, str, Decimal]], now: datetime | None = None) -> None:
        """Raises RedisUnavailable: the lifespan decides whether to start without seeded counters."""
        now = utc(now)
        batch: list[tuple[str, int, int]] = []
        for scope, period, units in _current_rows(rows, now):
            batch.append((self._key(scope, period, now), units, _ttl(period, now)))
            if len(batch) == SEED_CHUNK:
                await self._seed(batch)
                batch = []
        if batch:
            await self._seed(batch)

    async def _seed(self, batch: list[tuple[str, int, int]]) -> None:
        async def set_missing() -> None:
            # NX: a counter that exists already counts this spend, or more; a restarted worker or a
            # second replica must not add it again.
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, units, ttl in batch:
                    pipe.set(key, units, ex=ttl, nx=True)
                await pipe.execute()

        await self._guard.call(set_missing, timeout_s=SEED_TIMEOUT_S)

    def _key(self, scope: str, period: str, now: datetime) -> str:
        # The fixed-format period key ends the name, so scopes containing ':' cannot collide.
        return f"{self._prefix}{scope}:{period}:{period_key(period, now)}"


def _ttl(period: Period, now: datetime) -> int:
    return math.ceil((resets_at(period, now) - now).total_seconds()) + MARGIN_S
