"""What admitting a call holds for it until it is settled: the rate limits it counted against, the
scopes it is charged to, its token estimate and its budget reservation.

Plain values, beside the call record that carries them: the limits (`app/limits/`) make and settle them,
the metering hands them back when the call has been counted.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limit:
    scope: str  # "key:key_abc", "feature:search", "user:u-1"
    rpm: int | None
    tpm: int | None

    def __post_init__(self) -> None:
        if (self.rpm is not None and self.rpm < 0) or (self.tpm is not None and self.tpm < 0):
            raise ValueError(f"negative limit for {self.scope!r}")


@dataclass(frozen=True, slots=True)
class Reservation:
    """A call's worst case held against its budgets' counters (scope, period, period key) until it is
    settled or expires (a UNIX time). `units` may be 0: nothing is held, there is nothing to let go."""

    id: str
    units: int
    counters: tuple[tuple[str, str, str], ...]
    expires_at: float

    @property
    def member(self) -> str:
        # The amount rides in the name, so whoever finds the hold expired knows what to give back.
        return f"{self.id}:{self.units}"


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


def charge_to(api_key_id: str | None, feature: str | None, user_id: str | None) -> Admission | None:
    """For a call metered as another's (a background response, billed to the call that created it):
    nothing reserved or refused, its cost charged to that call's key, feature and user."""
    scopes = tuple(
        f"{kind}:{name}"
        for kind, name in (("key", api_key_id), ("feature", feature), ("user", user_id))
        if name is not None
    )
    return Admission((), scopes, 0) if scopes else None
