"""One metered call as the recorder persists it: a row of `usage_events`, or a line of the spool.

A NamedTuple in the order of the COPY columns, with the cost as an integer number of 1e-10 USD: building
one costs a fifth of a frozen dataclass, it goes to COPY as it is, and an integer encodes in half the time
of a Decimal (bench/README.md, "metering" steps). The spool keeps the dollar amount as a decimal string,
as it always has.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, NamedTuple

import orjson

UsageSource = Literal["upstream", "estimated"]

# The unit of cost_units, and the scale of usage_events.cost_usd (numeric(20,10)).
COST_EXPONENT = -10


def cost_to_usd(units: int | None) -> Decimal | None:
    return None if units is None else Decimal(units).scaleb(COST_EXPONENT)


def usd_to_cost(usd: Decimal | None) -> int | None:
    """Exact for amounts with at most ten decimals (ValueError otherwise: no silent rounding)."""
    if usd is None:
        return None
    scaled = usd.scaleb(-COST_EXPONENT)
    if not scaled.is_finite() or scaled != scaled.to_integral_value():
        raise ValueError("cost_usd must be a finite amount with at most ten decimals")
    return int(scaled)


class UsageEvent(NamedTuple):
    request_id: str
    # Timezone-aware: the daily rollup buckets by UTC date (build_event and from_json make it so).
    created_at: datetime
    api_key_id: str | None
    feature: str | None
    user_id: str | None
    endpoint: str
    model: str | None
    upstream_model: str | None
    stream: bool
    status_code: int
    attempts: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    usage_source: UsageSource
    # 1e-10 USD; None when the model has no price.
    cost_units: int | None
    latency_ms: int
    ttfb_ms: int | None
    error_type: str | None
    # The gateway dropped old messages to fit the feature's prompt budget.
    prompt_truncated: bool = False
    # The caller's X-Request-Id, when it sent one (request_id is always the gateway's own).
    client_request_id: str | None = None

    @property
    def cost_usd(self) -> Decimal | None:
        return cost_to_usd(self.cost_units)

    def to_json(self) -> bytes:
        """One line of JSON without the newline; the cost in USD as a string, so no precision is lost."""
        data: dict[str, Any] = self._asdict()
        del data["cost_units"]
        cost = self.cost_usd
        data["cost_usd"] = None if cost is None else str(cost)
        return orjson.dumps(data)

    @classmethod
    def from_json(cls, line: bytes) -> UsageEvent:
        """Raises ValueError on any malformed line (a torn write at a crash leaves one)."""
        try:
            data = orjson.loads(line)
            created_at = datetime.fromisoformat(data["created_at"])
            if created_at.utcoffset() is None:
                raise ValueError("naive created_at")
            cost = data["cost_usd"]
            values = {
                **{name: data[name] for name in _SPOOLED if name in data or name not in _DEFAULTED},
                "created_at": created_at,
                "cost_units": usd_to_cost(None if cost is None else Decimal(cost)),
            }
            # Keys written by a newer version are ignored, so an older gateway can still replay its spool.
            # A spool written before a column existed lacks its key: the field's default fills it.
            return cls(**values)
        except (KeyError, TypeError, ArithmeticError) as exc:
            raise ValueError(f"malformed usage event: {type(exc).__name__}") from None


_SPOOLED = tuple(name for name in UsageEvent._fields if name not in ("created_at", "cost_units"))
_DEFAULTED = frozenset(UsageEvent._field_defaults)
