"""Who makes a call, as the access layer finds it and every later layer reads it: the gateway key, and
the browser token a call may carry instead. Plain values: the key store (`app/access/keys.py`) makes
keys from their rows and the admin views show them, `app/access/browser_tokens.py` signs and checks
tokens; the call record, the policy and the limits only read them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    name: str
    owner: str | None
    prefix: str
    default_feature: str | None
    pin_feature: bool
    allowed_models: tuple[str, ...] | None
    # The endpoint classes it may call (app/access/endpoint_classes.py); None for every class.
    scopes: frozenset[str] | None
    rpm_limit: int | None
    tpm_limit: int | None
    budget_daily_usd: Decimal | None
    budget_monthly_usd: Decimal | None
    expires_at: datetime | None
    created_at: datetime
    revoked_at: datetime | None
    # It may read the usage reports (the `reports` scope, which no other scope implies).
    reports: bool = False
    # When its latest recorded call arrived (usage_events); read for the admin views, not for auth.
    last_used_at: datetime | None = None

    def usable(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    def state(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.expires_at is not None and self.expires_at <= now else "active"


@dataclass(frozen=True, slots=True)
class BrowserToken:
    id: str
    key_id: str
    user_id: str
    feature: str | None
    models: tuple[str, ...] | None
    origins: tuple[str, ...]
    expires_at: int  # Unix seconds
    rpm_limit: int | None
    budget_usd: Decimal | None

    def claims(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "key": self.key_id,
            "user": self.user_id,
            "feature": self.feature,
            "models": list(self.models) if self.models is not None else None,
            "origins": list(self.origins),
            "exp": self.expires_at,
            "rpm": self.rpm_limit,
            "budget": None if self.budget_usd is None else str(self.budget_usd),
        }

    @classmethod
    def from_claims(cls, claims: dict[str, Any]) -> BrowserToken:
        """Raises KeyError, TypeError or ArithmeticError on claims of another shape (signed, so only a
        change of this format could make them)."""
        models, budget = claims["models"], claims["budget"]
        return cls(
            id=str(claims["id"]),
            key_id=str(claims["key"]),
            user_id=str(claims["user"]),
            feature=None if claims["feature"] is None else str(claims["feature"]),
            models=None if models is None else tuple(map(str, models)),
            origins=tuple(map(str, claims["origins"])),
            expires_at=int(claims["exp"]),
            rpm_limit=None if claims["rpm"] is None else int(claims["rpm"]),
            budget_usd=None if budget is None else Decimal(budget),
        )
