"""One metered call as the recorder persists it: a row of `usage_events`, or a line of the spool.

A NamedTuple in the order of the table's columns, with the cost as an integer number of 1e-10 USD. The
recorder holds, writes and spools events as *lines*: each a JSON array of the fields in that order, the
time as integer microseconds since the Unix epoch (exact both ways), queued one after another in a single
buffer. The request path writes its line straight from the call (`usage.event_line`), without an event
object: on a saturated core every object a request builds field by field, or leaves alive, costs several
times its own run time in what it does to the caches, where one small bytes object appended to a buffer
and dropped costs about nothing (docs/performance-log.md, "What was left", metering). Postgres takes the
lines as they are (a batch's lines one parameter, split and parsed there). Spool files written before
lines existed hold one JSON object per event (`to_json`, still written for the rejected file an
operator reads); `from_line` reads both.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, NamedTuple

import orjson

UsageSource = Literal["upstream", "estimated"]

# The unit of cost_units, and the scale of usage_events.cost_usd (numeric(20,10)).
COST_EXPONENT = -10

# A model name lands in usage rows and in usage_daily's primary key: Postgres refuses an index entry
# past ~2.7 kB and any text holding NUL, and a refused row is a call nobody is billed for.
MAX_MODEL_CHARS = 256


def is_model_name(value: str) -> bool:
    return len(value) <= MAX_MODEL_CHARS and value.isprintable()


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def epoch_us(moment: datetime) -> int:
    return (moment - _EPOCH) // _MICROSECOND


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
    # Timezone-aware: the daily rollup buckets by UTC date (from_line reads UTC, from_json refuses a
    # naive time, the batch meter builds UTC times).
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
    # 1e-10 USD the budgets held for the call before it was made; None when no budget was asked. A cost
    # above it is spend the budgets did not see coming.
    reserved_units: int | None = None
    # The service tier the call was priced at: the one its answer reported (default, flex, priority,
    # scale), or batch for a Batch API line.
    service_tier: str | None = None
    # Which price entry priced it (`gpt-5-mini@flex`) and that entry's version; None when unpriced.
    price_key: str | None = None
    price_version: str | None = None
    # Subsets of prompt_tokens / completion_tokens, priced at their own rates.
    audio_prompt_tokens: int = 0
    audio_completion_tokens: int = 0
    image_prompt_tokens: int = 0
    image_completion_tokens: int = 0
    # The browser token the call was made with (api_key_id is the key that minted it).
    browser_token_id: str | None = None

    @property
    def cost_usd(self) -> Decimal | None:
        return cost_to_usd(self.cost_units)

    def to_line(self) -> bytes:
        """The event as a JSON array of its fields, newline-terminated; the cost in units, exact."""
        return line((self[0], epoch_us(self.created_at), *self[2:]))

    @classmethod
    def from_line(cls, text: bytes) -> UsageEvent:
        """A line of either form, to_line's array or to_json's object. Raises ValueError on any malformed
        line (a torn write at a crash leaves one)."""
        if text.lstrip()[:1] == b"{":
            return cls.from_json(text)
        try:
            values = orjson.loads(text)
            if not isinstance(values, list) or type(values[1]) is not int:
                raise TypeError("not an array with a time in microseconds")
            values[1] = _EPOCH + values[1] * _MICROSECOND
            # A newer version's line has more fields: the ones this version knows come first.
            return cls(*values[: len(cls._fields)])
        except (IndexError, TypeError, OverflowError) as exc:
            raise ValueError(f"malformed usage event: {type(exc).__name__}") from None

    def to_json(self) -> bytes:
        """One line of JSON without the newline; the cost in USD as a string, so no precision is lost."""
        data: dict[str, Any] = self._asdict()
        del data["cost_units"], data["reserved_units"]
        cost = self.cost_usd
        data["cost_usd"] = None if cost is None else str(cost)
        reserved = cost_to_usd(self.reserved_units)
        data["reserved_usd"] = None if reserved is None else str(reserved)
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
            reserved = data.get("reserved_usd")
            values = {
                **{name: data[name] for name in _SPOOLED if name in data or name not in _DEFAULTED},
                "created_at": created_at,
                "cost_units": usd_to_cost(None if cost is None else Decimal(cost)),
                "reserved_units": usd_to_cost(None if reserved is None else Decimal(reserved)),
            }
            # Keys written by a newer version are ignored, so an older gateway can still replay its spool.
            # A spool written before a column existed lacks its key: the field's default fills it.
            return cls(**values)
        except (KeyError, TypeError, ArithmeticError) as exc:
            raise ValueError(f"malformed usage event: {type(exc).__name__}") from None


def line(values: tuple[Any, ...]) -> bytes:
    """A line of the event whose fields, in UsageEvent's order, are `values` (the time in microseconds)."""
    return orjson.dumps(values, option=orjson.OPT_APPEND_NEWLINE)


_SPOOLED = tuple(
    name for name in UsageEvent._fields if name not in ("created_at", "cost_units", "reserved_units")
)
_DEFAULTED = frozenset(UsageEvent._field_defaults)


class Batch(NamedTuple):
    """Events as to_line() writes them, one after another: what the recorder queues, writes and spools."""

    data: bytes
    size: int

    @classmethod
    def of(cls, events: Sequence[UsageEvent]) -> Batch:
        return cls(b"".join(e.to_line() for e in events), len(events))

    def lines(self) -> list[bytes]:
        return self.data.splitlines(keepends=True)

    def events(self) -> list[UsageEvent]:
        return [UsageEvent.from_line(text) for text in self.lines()]

    def halves(self) -> tuple[Batch, Batch]:
        lines = self.lines()
        middle = len(lines) // 2
        return Batch(b"".join(lines[:middle]), middle), Batch(b"".join(lines[middle:]), len(lines) - middle)
