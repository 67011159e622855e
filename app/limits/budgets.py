"""Spend caps in USD per key, feature and user, per UTC day and UTC month.

reserve() runs before a call with the call's worst-case cost: it refuses the call when what is spent plus
what calls in flight hold, plus this call's worst case, would exceed a cap (or when the cap is already
reached), and otherwise holds that worst case against every budget, in one atomic step. settle() ends the
call: it lets go of the hold and adds the real cost, whatever the budgets. So concurrent calls never
overshoot a cap, as long as none costs more than it reserved. A hold carries an expiry: the hold of a
process that died before settling lapses on its own.

Money is counted in integer units of 1e-10 USD: exact in Python and in Redis' 64-bit INCRBY (up to
about $900M per counter). The Redis reservation compares amounts in Lua, whose doubles are exact up to
2**53 units (about $900k) and within a few units beyond; the counters themselves are only ever changed
by INCRBY/DECRBY with integer strings, so they stay exact.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, Literal, Protocol, cast

from redis.asyncio import Redis

from app.call.admission import Reservation
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
    is the first one checked and spent_usd is 0 (unknown). reserved_usd: what calls in flight held."""

    budget: Budget
    spent_usd: Decimal
    resets_at: datetime
    reason: Literal["over_budget", "ledger_unavailable"] = "over_budget"
    reserved_usd: Decimal = Decimal(0)


class BudgetLedger(Protocol):
    async def reserve(
        self, budgets: Sequence[Budget], amount_usd: Decimal, ttl_s: float, now: datetime | None = None
    ) -> Reservation | OverBudget | None:
        """Refuse (OverBudget) when a budget is already spent or held up to its cap, or when spent + held
        + amount would exceed it; else hold `amount` against every budget for `ttl_s` at most and return
        the Reservation. None: the ledger could not be asked and fails open."""
        ...

    async def settle(
        self,
        scopes: Sequence[str],
        cost_usd: Decimal,
        reservation: Reservation | None = None,
        now: datetime | None = None,
    ) -> None:
        """Let go of the reservation (if it has not expired) and add the call's real cost to the day and
        month counters of each scope, in one step."""
        ...

    async def spent(self, scope: str, period: str, now: datetime | None = None) -> Decimal: ...

    async def reserved(self, scope: str, period: str, now: datetime | None = None) -> Decimal:
        """What calls in flight hold against the scope's counter of this period."""
        ...

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
    if now.tzinfo is UTC:  # the usual case, a clock's reading: nothing to convert
        return now
    if now.tzinfo is None:
        # A naive time would silently be read as the server's local time, shifting every period.
        raise ValueError("now must be timezone-aware")
    return now.astimezone(UTC)


# The keys of the last day asked for, made once a day: a call's settle asks for up to six, and strftime
# costs a microsecond each.
_day_keys: tuple[int, dict[str, str]] = (-1, {})


def period_keys(now: datetime) -> dict[str, str]:
    """Each period's name, as usage rows group by it, for the periods `now` is in: "2026-11-25" for the
    day, "2026-11" for the month. The same mapping all day long: not to be changed."""
    global _day_keys
    day, keys = _day_keys
    ordinal = now.toordinal()
    if day != ordinal:
        keys = {"day": now.strftime("%Y-%m-%d"), "month": now.strftime("%Y-%m")}
        _day_keys = (ordinal, keys)
    return keys


def period_key(period: str, now: datetime) -> str:
    return period_keys(now)[_period(period)]


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


def _over(budget: Budget, spent: int, held: int, amount: int) -> bool:
    """The same test as the BUDGET_RESERVE script's. An exhausted budget refuses even a call estimated
    at zero: its real cost rarely is."""
    cap = to_units(budget.cap_usd)
    return spent + held >= cap or spent + held + amount > cap


def _refusal(budget: Budget, spent: int, held: int, now: datetime) -> OverBudget:
    return OverBudget(budget, to_usd(spent), resets_at(budget.period, now), reserved_usd=to_usd(held))


def _counter(budget: Budget, now: datetime) -> tuple[str, str, str]:
    return budget.scope, budget.period, period_key(budget.period, now)


def _new_reservation(budgets: Sequence[Budget], units: int, ttl_s: float, now: datetime) -> Reservation:
    counters = tuple(dict.fromkeys(_counter(b, now) for b in budgets))
    return Reservation(secrets.token_hex(8), units, counters, now.timestamp() + ttl_s)


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
        # (scope, period, period_key) -> units spent, and units held by calls in flight.
        self._units: dict[tuple[str, str, str], int] = {}
        self._held: dict[tuple[str, str, str], int] = {}
        # The holds not settled yet, by id, and their expiries in a heap (an entry whose hold was settled
        # is skipped when it comes up).
        self._holds: dict[str, Reservation] = {}
        self._expiries: list[tuple[float, str]] = []
        self._current: dict[str, str] = {}

    async def reserve(
        self, budgets: Sequence[Budget], amount_usd: Decimal, ttl_s: float, now: datetime | None = None
    ) -> Reservation | OverBudget | None:
        now = utc(now)
        self._expire(now)
        amount = to_units(amount_usd)
        for budget in budgets:
            counter = _counter(budget, now)
            spent, held = self._units.get(counter, 0), self._held.get(counter, 0)
            if _over(budget, spent, held, amount):
                return _refusal(budget, spent, held, now)
        reservation = _new_reservation(budgets, amount, ttl_s, now)
        if reservation.units and reservation.counters:
            for counter in reservation.counters:
                self._held[counter] = self._held.get(counter, 0) + reservation.units
            self._holds[reservation.id] = reservation
            heapq.heappush(self._expiries, (reservation.expires_at, reservation.id))
            if len(self._expiries) > 2 * len(self._holds) + 64:
                # Settled holds leave their entries behind until they would have expired: at a thousand
                # calls a second, a million of them. Rebuilt from the live holds, amortised O(1).
                self._expiries = [(held.expires_at, held.id) for held in self._holds.values()]
                heapq.heapify(self._expiries)
        return reservation

    async def settle(
        self,
        scopes: Sequence[str],
        cost_usd: Decimal,
        reservation: Reservation | None = None,
        now: datetime | None = None,
    ) -> None:
        self.settle_now(scopes, to_units(cost_usd), reservation, now)

    def settle_now(
        self,
        scopes: Sequence[str],
        units: int,
        reservation: Reservation | None = None,
        now: datetime | None = None,
    ) -> None:
        """settle(), which has nothing to wait for here, for a caller that need not await it, the cost in
        units (1e-10 USD) as the metering has it."""
        now = utc(now)
        self._forget_past(now)
        if reservation is not None:
            self._release(reservation.id)
        counted = self._units
        # A scope listed twice is still one payer.
        for scope in dict.fromkeys(scopes):
            for period, key in self._current.items():
                counter = (scope, period, key)
                counted[counter] = counted.get(counter, 0) + units

    async def spent(self, scope: str, period: str, now: datetime | None = None) -> Decimal:
        return to_usd(self._units.get(self._key(scope, period, utc(now)), 0))

    async def reserved(self, scope: str, period: str, now: datetime | None = None) -> Decimal:
        now = utc(now)
        self._expire(now)
        return to_usd(self._held.get(self._key(scope, period, now), 0))

    async def seed(self, rows: Iterable[tuple[str, str, str, Decimal]], now: datetime | None = None) -> None:
        now = utc(now)
        self._forget_past(now)
        for scope, period, units in _current_rows(rows, now):
            self._units.setdefault(self._key(scope, period, now), units)

    def _release(self, reservation_id: str) -> None:
        held = self._holds.pop(reservation_id, None)
        if held is None:
            return  # settled already, or expired
        for counter in held.counters:
            left = self._held.get(counter, 0) - held.units
            if left > 0:
                self._held[counter] = left
            else:
                self._held.pop(counter, None)

    def _expire(self, now: datetime) -> None:
        moment = now.timestamp()
        while self._expiries and self._expiries[0][0] <= moment:
            _, reservation_id = heapq.heappop(self._expiries)
            self._release(reservation_id)

    @staticmethod
    def _key(scope: str, period: str, now: datetime) -> tuple[str, str, str]:
        return scope, period, period_key(period, now)

    def _forget_past(self, now: datetime) -> None:
        current = period_keys(now)
        if current is not self._current:
            self._units = {k: units for k, units in self._units.items() if k[2] == current[k[1]]}
            self._current = current


class RedisBudgetLedger(RedisBacked):
    """Budgets shared by every worker and replica using the same Redis. Per scope and period: the spent
    counter `{prefix}{scope}:{day|month}:{period_key}`, and beside it the holds of calls in flight (a
    sorted set `…:held` of `id:units` by expiry, and their sum `…:held-units`), all expiring an hour
    after their period.

    `redis` is a URL (the ledger then owns its client and closes it in aclose()) or a client from
    redis_guard.redis_client() shared with the rate limiter (closed by whoever made it).
    """

    WHAT = "budgets"
    PREFIX = "gw:budget:"

    def __init__(self, redis: str | Redis, **options: Any) -> None:
        super().__init__(redis, **options)
        self._reserve_script = self._redis.register_script(redis_scripts.BUDGET_RESERVE)
        self._settle_script = self._redis.register_script(redis_scripts.BUDGET_SETTLE)

    async def reserve(
        self, budgets: Sequence[Budget], amount_usd: Decimal, ttl_s: float, now: datetime | None = None
    ) -> Reservation | OverBudget | None:
        now = utc(now)
        reservation = _new_reservation(budgets, to_units(amount_usd), ttl_s, now)
        if not budgets:
            return reservation
        keys: list[str] = []
        limits: list[str | int] = []
        for budget in budgets:
            counter = self._key(budget.scope, budget.period, now)
            keys += [counter, counter + HELD, counter + HELD_UNITS]
            limits += [str(to_units(budget.cap_usd)), _ttl(budget.period, now)]
        hold = reservation.units > 0
        args: list[str | int] = [
            repr(now.timestamp()),
            str(reservation.units),
            "1" if hold else "0",
            reservation.member,
            repr(reservation.expires_at),
            *limits,
        ]
        try:
            verdict = await self._guard.call(lambda: self._reserve_script(keys=keys, args=args))
        except RedisUnavailable:
            if self._guard.fail_open:
                return None
            first = budgets[0]
            return OverBudget(first, Decimal(0), resets_at(first.period, now), "ledger_unavailable")
        if verdict is not None:
            index, spent, held = verdict
            return _refusal(budgets[int(index) - 1], int(spent), int(held), now)
        return reservation

    async def settle(
        self,
        scopes: Sequence[str],
        cost_usd: Decimal,
        reservation: Reservation | None = None,
        now: datetime | None = None,
    ) -> None:
        units = to_units(cost_usd)
        now = utc(now)
        keys: list[str] = []
        ttls: list[int] = []
        if units:
            # A scope listed twice is still one payer.
            for scope in dict.fromkeys(scopes):
                for period in PERIODS:
                    keys.append(self._key(scope, period, now))
                    ttls.append(_ttl(period, now))
        charged = len(keys)
        member = ""
        if reservation is not None and reservation.units:
            member = reservation.member
            for scope, held_period, key in reservation.counters:
                counter = f"{self._prefix}{scope}:{held_period}:{key}"
                keys += [counter + HELD, counter + HELD_UNITS]
        if not keys:
            return
        # Nothing to refuse after the call. A settle lost here leaves the counters short by its cost
        # for the rest of the period (counted in unchecked), and its hold until the hold expires; the
        # usage row stays the record of spend.
        with contextlib.suppress(RedisUnavailable):
            await self._guard.call(
                lambda: self._settle_script(keys=keys, args=[str(units), member, charged, *ttls])
            )

    async def reserved(self, scope: str, period: str, now: datetime | None = None) -> Decimal:
        """The holds that have not expired (an expired one is cleared by the next reserve()). Raises
        RedisUnavailable rather than report an unknown amount as zero."""
        now = utc(now)
        key = self._key(scope, period, now) + HELD
        # Members are b"id:units": the limits' clients do not decode responses.
        members = cast(
            list[bytes],
            await self._guard.call(lambda: self._redis.zrangebyscore(key, f"({now.timestamp()!r}", "+inf")),
        )
        units: int = sum(int(member.rsplit(b":", 1)[1]) for member in members)
        return to_usd(units)

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


# Suffixes of a counter's key for the holds beside it. A counter's key ends with its period key, a date,
# so no scope can make one of these collide with another scope's counter.
HELD = ":held"
HELD_UNITS = ":held-units"


def _ttl(period: Period, now: datetime) -> int:
    return math.ceil((resets_at(period, now) - now).total_seconds()) + MARGIN_S
