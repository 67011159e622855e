"""One metered call as the recorder persists it: a row of `usage_events`, or a line of the spool."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

import orjson

UsageSource = Literal["upstream", "estimated"]


@dataclass(slots=True, frozen=True)
class UsageEvent:
    request_id: str
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
    cost_usd: Decimal | None
    latency_ms: int
    ttfb_ms: int | None
    error_type: str | None
    # The gateway dropped old messages to fit the feature's prompt budget.
    prompt_truncated: bool = False

    def __post_init__(self) -> None:
        # The daily rollup buckets by UTC date; a naive timestamp would land in the wrong day silently.
        if self.created_at.utcoffset() is None:
            raise ValueError("UsageEvent.created_at must be timezone-aware")

    def to_json(self) -> bytes:
        """One line of JSON without the newline; Decimal as a string so no precision is lost."""
        return orjson.dumps(self, default=_encode_decimal)

    @classmethod
    def from_json(cls, line: bytes) -> UsageEvent:
        """Raises ValueError on any malformed line (a torn write at a crash leaves one)."""
        try:
            data = orjson.loads(line)
            data["created_at"] = datetime.fromisoformat(data["created_at"])
            cost = data["cost_usd"]
            data["cost_usd"] = None if cost is None else Decimal(cost)
            # Keys written by a newer version are ignored, so an older gateway can still replay its spool.
            # A spool written before a column existed lacks its key: the field's default fills it.
            return cls(
                **{name: data[name] for name in _FIELD_NAMES if name in data or name not in _DEFAULTED}
            )
        except (KeyError, TypeError, ArithmeticError) as exc:
            raise ValueError(f"malformed usage event: {type(exc).__name__}") from None


_FIELD_NAMES = tuple(f.name for f in fields(UsageEvent))
_DEFAULTED = frozenset(f.name for f in fields(UsageEvent) if f.default is not MISSING)


def _encode_decimal(value: Any) -> str:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")
