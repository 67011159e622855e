"""What admitting a call holds for it until it is settled: the rate limits it counted against, the
scopes it is charged to, its token estimate and its budget reservation.

A module of its own so that the call record can name it without importing the guard, which imports the
call record.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.limits.budgets import Reservation
from app.limits.ratelimit import Limit


@dataclass(frozen=True, slots=True)
class Admission:
    limits: tuple[Limit, ...]
    scopes: tuple[str, ...]
    token_estimate: int
    # What the budgets hold for the call until it is settled; None when no budget was asked (none
    # applies, or the ledger failed open).
    reservation: Reservation | None = None

    @property
    def reserved_units(self) -> int | None:
        return None if self.reservation is None else self.reservation.units
