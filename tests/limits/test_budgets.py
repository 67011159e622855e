"""The budget ledgers against a real Redis and real processes; time comes from an injected clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from redis.asyncio import Redis

from app.call.admission import Reservation
from app.limits import (
    Budget,
    BudgetLedger,
    InProcessBudgetLedger,
    OverBudget,
    RedisBudgetLedger,
    RedisUnavailable,
)
from app.limits.budgets import period_key, resets_at, to_units, to_usd
from tests.limits import CLOSED_URL, REDIS_URL, delete_keys, run_workers, unique_prefix

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
MIDNIGHT = datetime(2026, 11, 26, tzinfo=UTC)


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    made = unique_prefix("budget")
    yield made
    await delete_keys(made)


@pytest.fixture(params=["in-process", "redis"])
async def ledger(request: pytest.FixtureRequest, prefix: str) -> AsyncIterator[BudgetLedger]:
    made: BudgetLedger
    if request.param == "redis":
        made = RedisBudgetLedger(REDIS_URL, prefix=prefix, timeout_s=1.0)
    else:
        made = InProcessBudgetLedger()
    yield made
    assert not made.degraded
    await made.aclose()


def usd(amount: str) -> Decimal:
    return Decimal(amount)


async def check(
    ledger: BudgetLedger, budgets: list[Budget], amount_usd: Decimal, now: datetime
) -> OverBudget | None:
    """The verdict of a reservation, let go of at once: the budgets' test without a hold left behind."""
    verdict = await ledger.reserve(budgets, amount_usd, 60, now)
    if isinstance(verdict, Reservation):
        await ledger.settle([], usd("0"), verdict, now)
        return None
    return verdict


async def test_trips_at_the_right_cent(ledger: BudgetLedger) -> None:
    budgets = [Budget("key:a", "day", usd("0.05"))]
    await ledger.settle(["key:a"], usd("0.02"), None, NOW)
    await ledger.settle(["key:a"], usd("0.02"), None, NOW)
    # 0.04 + 0.01 = 0.05 <= 0.05: reaching the cap exactly is allowed; one unit more is not.
    assert await check(ledger, budgets, usd("0.01"), NOW) is None
    over = await check(ledger, budgets, usd("0.0100000001"), NOW)
    assert over == OverBudget(budgets[0], usd("0.04"), MIDNIGHT)

    await ledger.settle(["key:a"], usd("0.01"), None, NOW)
    assert await ledger.spent("key:a", "day", NOW) == usd("0.05")
    over = await check(ledger, budgets, usd("0.0000000001"), NOW)
    assert over == OverBudget(budgets[0], usd("0.05"), MIDNIGHT)
    # A spent cap refuses even a call estimated at nothing.
    assert await check(ledger, budgets, usd("0"), NOW) is not None


async def test_the_first_exceeded_budget_is_reported(ledger: BudgetLedger) -> None:
    await ledger.settle(["key:a", "user:u-1"], usd("3"), None, NOW)
    budgets = [
        Budget("key:a", "month", usd("100")),
        Budget("user:u-1", "day", usd("4")),
        Budget("user:u-1", "month", usd("4.2")),
    ]
    # 3 + 1.5 exceeds both of the user's caps; the first one listed is reported.
    over = await check(ledger, budgets, usd("1.5"), NOW)
    assert over is not None
    assert over.budget == budgets[1]
    assert over.spent_usd == usd("3")
    assert await check(ledger, budgets, usd("1"), NOW) is None
    assert await check(ledger, [], usd("1000"), NOW) is None


async def test_charge_counts_each_scope_once_in_both_periods(ledger: BudgetLedger) -> None:
    await ledger.settle(["key:a", "feature:f", "key:a"], usd("0.25"), None, NOW)
    await ledger.settle([], usd("1"), None, NOW)
    for scope in ("key:a", "feature:f"):
        assert await ledger.spent(scope, "day", NOW) == usd("0.25")
        assert await ledger.spent(scope, "month", NOW) == usd("0.25")
    assert await ledger.spent("user:nobody", "day", NOW) == 0


async def test_amounts_past_2_to_the_53_units_stay_exact(ledger: BudgetLedger) -> None:
    await ledger.settle(["key:a"], usd("987654.3210987654"), None, NOW)
    await ledger.settle(["key:a"], usd("0.0000000001"), None, NOW)
    assert await ledger.spent("key:a", "month", NOW) == usd("987654.3210987655")


async def test_the_day_resets_at_utc_midnight(ledger: BudgetLedger) -> None:
    budgets = [Budget("user:u-1", "day", usd("1")), Budget("user:u-1", "month", usd("10"))]
    last_second = datetime(2026, 11, 25, 23, 59, 59, tzinfo=UTC)
    await ledger.settle(["user:u-1"], usd("1"), None, last_second)
    assert await check(ledger, budgets, usd("0.01"), last_second) == OverBudget(
        budgets[0], usd("1"), MIDNIGHT
    )
    assert await check(ledger, budgets, usd("0.01"), MIDNIGHT) is None
    assert await ledger.spent("user:u-1", "day", MIDNIGHT) == 0
    assert await ledger.spent("user:u-1", "month", MIDNIGHT) == usd("1")


@pytest.mark.parametrize(
    ("last_second", "next_month"),
    [
        (datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)),
        (datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
    ],
)
async def test_the_month_resets_on_the_first(
    ledger: BudgetLedger, last_second: datetime, next_month: datetime
) -> None:
    budgets = [Budget("feature:f", "month", usd("2"))]
    await ledger.settle(["feature:f"], usd("2"), None, last_second)
    over = await check(ledger, budgets, usd("0.01"), last_second)
    assert over is not None
    assert over.resets_at == next_month
    assert await check(ledger, budgets, usd("2"), next_month) is None


@pytest.mark.parametrize(
    ("period", "now", "expected"),
    [
        ("day", datetime(2026, 11, 25, 0, 0, tzinfo=UTC), datetime(2026, 11, 26, tzinfo=UTC)),
        ("day", datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
        ("day", datetime(2028, 2, 28, 12, tzinfo=UTC), datetime(2028, 2, 29, tzinfo=UTC)),
        ("month", datetime(2028, 2, 29, 12, tzinfo=UTC), datetime(2028, 3, 1, tzinfo=UTC)),
        ("month", datetime(2026, 1, 1, 0, 0, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC)),
    ],
)
def test_resets_at(period: str, now: datetime, expected: datetime) -> None:
    assert resets_at(period, now) == expected


async def test_periods_are_utc_whatever_the_callers_zone(ledger: BudgetLedger) -> None:
    # 01:00 on the 26th in UTC+2 is still the 25th in UTC.
    east = datetime(2026, 11, 26, 1, 0, tzinfo=timezone(timedelta(hours=2)))
    await ledger.settle(["key:a"], usd("1"), None, east)
    assert await ledger.spent("key:a", "day", NOW) == usd("1")
    with pytest.raises(ValueError, match="timezone-aware"):
        await ledger.spent("key:a", "day", datetime(2026, 11, 25, 12, 0))


async def test_seed_loads_the_current_periods_and_never_doubles(ledger: BudgetLedger) -> None:
    rows = [
        ("key:a", "day", "2026-11-25", usd("0.30")),
        ("key:a", "month", "2026-11", usd("1.20")),
        ("key:a", "day", "2026-11-24", usd("5")),  # yesterday: history, not today's spend
    ]
    await ledger.seed(rows, NOW)
    await ledger.seed(rows, NOW)  # a restart, or a second replica starting
    assert await ledger.spent("key:a", "day", NOW) == usd("0.30")
    assert await ledger.spent("key:a", "month", NOW) == usd("1.20")

    await ledger.settle(["key:a"], usd("0.10"), None, NOW)
    await ledger.seed(rows, NOW)
    assert await ledger.spent("key:a", "day", NOW) == usd("0.40")
    with pytest.raises(ValueError, match="period"):
        await ledger.seed([("key:a", "week", "2026-W48", usd("1"))], NOW)


async def test_a_second_replica_sees_the_spend_and_its_seed_adds_nothing(prefix: str) -> None:
    first = RedisBudgetLedger(REDIS_URL, prefix=prefix, timeout_s=1.0)
    second = RedisBudgetLedger(REDIS_URL, prefix=prefix, timeout_s=1.0)
    try:
        await first.seed([("user:u-1", "day", "2026-11-25", usd("1"))], NOW)
        await first.settle(["user:u-1"], usd("0.5"), None, NOW)
        await second.seed([("user:u-1", "day", "2026-11-25", usd("1.5"))], NOW)
        assert await second.spent("user:u-1", "day", NOW) == usd("1.5")
    finally:
        await first.aclose()
        await second.aclose()


def test_money_is_exact_to_a_ten_billionth_of_a_dollar() -> None:
    assert to_units(usd("0.0000001234")) == 1234
    assert to_usd(to_units(usd("123456.789"))) == usd("123456.789")
    assert sum(to_units(usd("0.1")) for _ in range(10)) == to_units(usd("1"))
    assert period_key("day", NOW) == "2026-11-25"
    assert period_key("month", NOW) == "2026-11"


async def test_in_process_counters_keep_only_the_current_periods() -> None:
    ledger = InProcessBudgetLedger()
    for n in range(50):
        await ledger.settle([f"user:{n}"], usd("1"), None, NOW)
    await ledger.settle(["user:late"], usd("1"), None, datetime(2026, 12, 1, tzinfo=UTC))
    assert len(ledger._units) == 2


async def test_redis_counters_expire_an_hour_after_their_period(prefix: str) -> None:
    ledger = RedisBudgetLedger(REDIS_URL, prefix=prefix, timeout_s=1.0)
    client = Redis.from_url(REDIS_URL)
    last_second = datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC)
    try:
        await ledger.settle(["key:a"], usd("1"), None, last_second)
        assert await client.ttl(f"{prefix}key:a:day:2026-11-30") == 1 + 3600
        assert await client.ttl(f"{prefix}key:a:month:2026-11") == 1 + 3600
        assert await client.get(f"{prefix}key:a:month:2026-11") == str(10**10).encode()
    finally:
        await client.aclose()
        await ledger.aclose()


WORKER = """
import asyncio, sys
from datetime import datetime
from decimal import Decimal
from app.limits import RedisBudgetLedger

async def main(url, prefix, now, tasks, charges):
    ledger = RedisBudgetLedger(url, prefix=prefix, timeout_s=5.0)
    cost = Decimal("0.0123456789")

    async def spend():
        for _ in range(charges):
            await ledger.settle(["feature:shared", "user:shared"], cost, None, now)

    await ledger.spent("feature:shared", "day", now)  # connect before the start
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await asyncio.gather(*(spend() for _ in range(tasks)))
    print(ledger.redis_errors)
    await ledger.aclose()

asyncio.run(main(sys.argv[1], sys.argv[2], datetime.fromisoformat(sys.argv[3]), 8, 50))
"""


async def test_two_processes_charging_one_redis_sum_exactly(prefix: str) -> None:
    assert await run_workers(WORKER, REDIS_URL, prefix, NOW.isoformat()) == ["0", "0"]
    ledger = RedisBudgetLedger(REDIS_URL, prefix=prefix, timeout_s=1.0)
    try:
        expected = 2 * 8 * 50 * usd("0.0123456789")
        for scope in ("feature:shared", "user:shared"):
            assert await ledger.spent(scope, "day", NOW) == expected
            assert await ledger.spent(scope, "month", NOW) == expected
    finally:
        await ledger.aclose()


async def test_unreachable_redis_fails_open_quickly() -> None:
    ledger = RedisBudgetLedger(CLOSED_URL)
    budgets = [Budget("key:a", "day", usd("0"))]
    try:
        started = time.perf_counter()
        assert await check(ledger, budgets, usd("1"), NOW) is None
        await ledger.settle(["key:a"], usd("1"), None, NOW)
        assert time.perf_counter() - started < 0.1
        assert ledger.degraded
        assert (ledger.redis_errors, ledger.unchecked) == (1, 2)
        # An unknown spend is an error for the admin API, not a zero.
        with pytest.raises(RedisUnavailable):
            await ledger.spent("key:a", "day", NOW)
    finally:
        await ledger.aclose()


async def test_unreachable_redis_fails_closed_with_a_reason() -> None:
    ledger = RedisBudgetLedger(CLOSED_URL, fail_open=False)
    budgets = [Budget("key:a", "month", usd("100"))]
    try:
        started = time.perf_counter()
        over = await check(ledger, budgets, usd("1"), NOW)
        assert time.perf_counter() - started < 0.1
        assert over == OverBudget(
            budgets[0], usd("0"), datetime(2026, 12, 1, tzinfo=UTC), "ledger_unavailable"
        )
    finally:
        await ledger.aclose()


async def test_seed_reports_an_unreachable_redis() -> None:
    ledger = RedisBudgetLedger(CLOSED_URL)
    try:
        with pytest.raises(RedisUnavailable):
            await ledger.seed([("key:a", "day", "2026-11-25", usd("1"))], NOW)
    finally:
        await ledger.aclose()


async def test_concurrent_reservations_hold_the_cap(ledger: BudgetLedger) -> None:
    budgets = [Budget("key:a", "day", usd("3")), Budget("feature:f", "month", usd("100"))]
    verdicts = await asyncio.gather(*(ledger.reserve(budgets, usd("1"), 60, NOW) for _ in range(50)))
    held = [v for v in verdicts if isinstance(v, Reservation)]
    refused = [v for v in verdicts if isinstance(v, OverBudget)]
    assert (len(held), len(refused)) == (3, 47)
    assert refused[-1] == OverBudget(budgets[0], usd("0"), MIDNIGHT, reserved_usd=usd("3"))
    assert await ledger.reserved("key:a", "day", NOW) == usd("3")
    assert await ledger.reserved("feature:f", "month", NOW) == usd("3")
    assert await ledger.spent("key:a", "day", NOW) == 0
    for reservation in held:
        await ledger.settle(["key:a", "feature:f"], usd("0.9"), reservation, NOW)
    assert await ledger.reserved("key:a", "day", NOW) == 0
    assert await ledger.spent("key:a", "day", NOW) == usd("2.7")
    assert isinstance(await ledger.reserve(budgets, usd("0.3000000001"), 60, NOW), OverBudget)
    assert isinstance(await ledger.reserve(budgets, usd("0.3"), 60, NOW), Reservation)


async def test_a_hold_left_behind_expires_and_is_given_back_once(ledger: BudgetLedger) -> None:
    budgets = [Budget("key:a", "day", usd("1"))]
    orphan = await ledger.reserve(budgets, usd("1"), 10, NOW)
    assert isinstance(orphan, Reservation)
    assert isinstance(await ledger.reserve(budgets, usd("0.01"), 10, NOW + timedelta(seconds=9)), OverBudget)
    later = NOW + timedelta(seconds=11)
    assert await ledger.reserved("key:a", "day", later) == 0
    fresh = await ledger.reserve(budgets, usd("0.6"), 10, later)
    assert isinstance(fresh, Reservation)
    # The orphan's process was only slow: its settle charges the cost, and leaves the new hold alone.
    await ledger.settle(["key:a"], usd("0.2"), orphan, later)
    assert await ledger.reserved("key:a", "day", later) == usd("0.6")
    assert await ledger.spent("key:a", "day", later) == usd("0.2")
    await ledger.settle(["key:a"], usd("0.6"), fresh, later)
    await ledger.settle(["key:a"], usd("0"), fresh, later)  # a second settle gives nothing back
    assert await ledger.reserved("key:a", "day", later) == 0
    assert await ledger.spent("key:a", "day", later) == usd("0.8")


async def test_a_reservation_of_nothing_holds_nothing(ledger: BudgetLedger) -> None:
    budgets = [Budget("user:u", "day", usd("1"))]
    nothing = await ledger.reserve(budgets, usd("0"), 60, NOW)
    assert isinstance(nothing, Reservation) and nothing.units == 0
    assert await ledger.reserved("user:u", "day", NOW) == 0


RESERVING_WORKER = """
import asyncio, sys
from datetime import datetime
from decimal import Decimal
from app.call.admission import Reservation
from app.limits import Budget, RedisBudgetLedger

async def main(url, prefix, now):
    ledger = RedisBudgetLedger(url, prefix=prefix, timeout_s=5.0)
    budgets = [Budget("key:shared", "day", Decimal("0.03")), Budget("user:shared", "month", Decimal("1"))]
    await ledger.spent("key:shared", "day", now)  # connect before the start
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    verdicts = await asyncio.gather(*(ledger.reserve(budgets, Decimal("0.01"), 60, now) for _ in range(25)))
    print(sum(isinstance(v, Reservation) for v in verdicts), ledger.redis_errors)
    await ledger.aclose()

asyncio.run(main(sys.argv[1], sys.argv[2], datetime.fromisoformat(sys.argv[3])))
"""


async def test_two_processes_reserving_on_one_redis_hold_the_cap(prefix: str) -> None:
    results = await run_workers(RESERVING_WORKER, REDIS_URL, prefix, NOW.isoformat())
    held = [int(line.split()[0]) for line in results]
    assert [line.split()[1] for line in results] == ["0", "0"]
    assert sum(held) == 3
    ledger = RedisBudgetLedger(REDIS_URL, prefix=prefix, timeout_s=1.0)
    try:
        assert await ledger.reserved("key:shared", "day", NOW) == usd("0.03")
        assert await ledger.reserved("user:shared", "month", NOW) == usd("0.03")
    finally:
        await ledger.aclose()


async def test_unreachable_redis_reserves_by_the_fail_mode() -> None:
    budgets = [Budget("key:a", "day", usd("1"))]
    for fail_open in (True, False):
        ledger = RedisBudgetLedger(CLOSED_URL, fail_open=fail_open)
        try:
            verdict = await ledger.reserve(budgets, usd("0.5"), 60, NOW)
            # A settle with nothing reachable loses nothing but time, and takes none.
            started = time.perf_counter()
            await ledger.settle(["key:a"], usd("0.5"), None, NOW)
            assert time.perf_counter() - started < 0.1
        finally:
            await ledger.aclose()
        if fail_open:
            assert verdict is None
        else:
            assert verdict == OverBudget(budgets[0], usd("0"), MIDNIGHT, "ledger_unavailable")


async def test_in_process_holds_settled_leave_nothing_behind() -> None:
    ledger = InProcessBudgetLedger()
    budgets = [Budget("key:a", "day", usd("1"))]
    for _ in range(1000):
        held = await ledger.reserve(budgets, usd("0.5"), 3600, NOW)
        assert isinstance(held, Reservation)
        await ledger.settle(["key:a"], usd("0"), held, NOW)
    # The expiry of every settled hold is not kept for the hour it would have lasted.
    assert len(ledger._expiries) <= 64 + 2
    assert await ledger.reserved("key:a", "day", NOW) == 0
