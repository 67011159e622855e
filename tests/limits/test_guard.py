"""The guard between the routes and the limits, in the process: a call whose scopes have no limit or
budget is admitted without its size being estimated, and its cost still counts towards its scopes (a
budget set for them later starts from it); one with a budget is sized once and held."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from app.call.record import CallRecord
from app.config_file import Caps, GatewayConfig
from app.limits import InProcessBudgetLedger, InProcessRateLimiter
from app.limits.budgets import to_usd
from app.limits.guard import Guard
from app.metering.pricing import PriceTable

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def _guard() -> tuple[Guard, InProcessBudgetLedger]:
    ledger = InProcessBudgetLedger()
    return Guard(InProcessRateLimiter(), ledger, clock=lambda: NOW, reservation_ttl_s=60), ledger


class _Sizes:
    """A call's sizes, as the route gives them to the guard, and how often the guard asked for them."""

    def __init__(self, prompt: int, completion: int, worst: int) -> None:
        self.sizes = (prompt, completion, worst)
        self.asked = 0

    def __call__(self) -> tuple[int, int, int]:
        self.asked += 1
        return self.sizes


def _call(user: str) -> CallRecord:
    call = CallRecord(request_id="req_guard", method="POST", path="/v1/chat/completions")
    call.admitted.user_id = user
    return call


async def test_a_scope_without_limits_is_admitted_unsized_and_still_charged() -> None:
    guard, ledger = _guard()
    sizes = _Sizes(100, 50, 50)
    admission = await guard.admit(_call("u-1"), GatewayConfig(), PriceTable({}), "gpt-4o-mini", sizes)
    assert admission is not None
    assert sizes.asked == 0
    assert admission.scopes == ("user:u-1",) and admission.limits == () and admission.reservation is None
    guard.settle(admission, 150, 12_345)
    assert await ledger.spent("user:u-1", "day", NOW) == to_usd(12_345)
    assert await ledger.spent("user:u-1", "month", NOW) == to_usd(12_345)


async def test_a_scope_with_a_budget_is_sized_once_and_held_until_settled() -> None:
    guard, ledger = _guard()
    sizes = _Sizes(1_000, 0, 1_000)
    config = GatewayConfig(users=Caps(budget_daily_usd=Decimal("1")))
    admission = await guard.admit(_call("u-2"), config, PriceTable({}), "gpt-4o-mini", sizes)
    assert admission is not None and admission.reservation is not None
    assert sizes.asked == 1
    held = admission.reservation.units
    assert held > 0
    assert await ledger.reserved("user:u-2", "day", NOW) == to_usd(held)
    guard.settle(admission, 2_000, 7)
    assert await ledger.reserved("user:u-2", "day", NOW) == 0
    assert await ledger.spent("user:u-2", "day", NOW) == to_usd(7)
