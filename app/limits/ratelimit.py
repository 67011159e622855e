"""Requests-per-minute and tokens-per-minute limits per key, feature and user.

The algorithm is the sliding-window counter, the standard approximation of a sliding 60 s window:
a request is judged against `previous_minute * (1 - elapsed / 60) + current_minute`, where minutes
are aligned to the epoch and `elapsed` is the time since the current one began. It keeps two counters
per scope instead of a log of timestamps, and assumes the previous minute's traffic was spread evenly.

admit() judges every given limit at once and counts only if all of them admit, so a request refused
by its user's limit does not use up its feature's. Tokens are reserved at admission from the
estimate; settle() corrects them by (actual - estimate) once the call has ended.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from redis.asyncio import Redis

from app.call.admission import Limit
from app.limits import redis_scripts
from app.limits.redis_guard import InProcess, RedisBacked, RedisUnavailable

WINDOW_S = 60.0
# A minute's counters serve as the previous minute for one more minute, then are never read again.
KEY_TTL_S = 120

Kind = Literal["requests", "tokens"]
_KINDS: tuple[Kind, Kind] = ("requests", "tokens")
_ZERO = (0, 0)


@dataclass(frozen=True)
class Denied:
    """Why a request was refused.

    retry_after_s is the precise wait before this request would fit if nothing else arrived; it is
    infinite when the request alone exceeds the limit (tokens > tpm, or rpm == 0), which waiting
    cannot fix. When the limiter is unavailable and fails closed, reason says so, scope is the first
    limit's, limit is 0, and retry_after_s is the time until Redis is tried again.
    """

    scope: str
    kind: Kind
    limit: int
    retry_after_s: float
    reason: Literal["limit_exceeded", "limiter_unavailable"] = "limit_exceeded"

    @property
    def retry_after_header(self) -> str | None:
        """Whole seconds for Retry-After (at least 1), or None when retrying cannot succeed."""
        if math.isinf(self.retry_after_s):
            return None
        return str(max(1, math.ceil(self.retry_after_s)))


class RateLimiter(Protocol):
    async def admit(self, limits: Sequence[Limit], tokens: int, now: float | None = None) -> Denied | None:
        """Count one request and reserve `tokens` against every limit, or count nothing and deny."""
        ...

    async def settle(self, limits: Sequence[Limit], token_delta: int, now: float | None = None) -> None:
        """Correct the tokens reserved at admission by (actual - estimate)."""
        ...

    @property
    def degraded(self) -> bool: ...

    @property
    def redis_errors(self) -> int: ...

    async def aclose(self) -> None: ...


def _window(now: float) -> tuple[int, float]:
    """The epoch minute `now` falls in, and the seconds elapsed in it."""
    minute = math.floor(now / WINDOW_S)
    return minute, now - minute * WINDOW_S


def _exceeds(cap: int, prev: int, cur: int, cost: int, weight: float) -> bool:
    # Keep in step with redis_scripts.ADMIT: same expression, same order of operations.
    return prev * weight + cur + cost > cap


def _retry_after(cap: int, prev: int, cur: int, cost: int, elapsed: float) -> float:
    """Seconds until the request fits as the previous minute's weight falls, if nothing else arrives."""
    if cost > cap:
        return math.inf
    if cur + cost <= cap:
        # It fits within this minute, once prev (> 0, else it would fit now) weighs little enough.
        return max(WINDOW_S * (1 - (cap - cur - cost) / prev) - elapsed, 0.0)
    # Only in the next minute, once this minute's count, by then the previous one, weighs little enough.
    return WINDOW_S - elapsed + WINDOW_S * (1 - (cap - cost) / cur)


def _denied(scope: str, kind: int, cap: int, prev: int, cur: int, tokens: int, elapsed: float) -> Denied:
    cost = 1 if kind == 0 else tokens
    return Denied(scope, _KINDS[kind], cap, _retry_after(cap, prev, cur, cost, elapsed))


def _active(limits: Sequence[Limit], tokens: int) -> list[Limit]:
    if tokens < 0:
        raise ValueError("tokens must not be negative")
    return [limit for limit in limits if limit.rpm is not None or limit.tpm is not None]


class InProcessRateLimiter(InProcess):
    """Limits for one process: a single worker, or tests. Keeps only the two minutes still read."""

    def __init__(self) -> None:
        # (scope, minute) -> [requests, tokens]
        self._counts: dict[tuple[str, int], list[int]] = {}
        self._minute = 0

    async def admit(self, limits: Sequence[Limit], tokens: int, now: float | None = None) -> Denied | None:
        active = _active(limits, tokens)
        minute, elapsed = _window(time.time() if now is None else now)
        self._forget_before(minute - 1)
        weight = 1 - elapsed / WINDOW_S
        # No await from here on: the check and the counting are atomic within the event loop.
        for limit in active:
            cur = self._counts.get((limit.scope, minute), _ZERO)
            prev = self._counts.get((limit.scope, minute - 1), _ZERO)
            for kind, (cap, cost) in enumerate(((limit.rpm, 1), (limit.tpm, tokens))):
                if cap is not None and _exceeds(cap, prev[kind], cur[kind], cost, weight):
                    return _denied(limit.scope, kind, cap, prev[kind], cur[kind], tokens, elapsed)
        for limit in active:
            counts = self._counts.setdefault((limit.scope, minute), [0, 0])
            counts[0] += 1
            counts[1] += tokens
        return None

    async def settle(self, limits: Sequence[Limit], token_delta: int, now: float | None = None) -> None:
        self.settle_now(limits, token_delta, now)

    def settle_now(self, limits: Sequence[Limit], token_delta: int, now: float | None = None) -> None:
        """settle(), which has nothing to wait for here, for a caller that need not await it."""
        if token_delta == 0:
            return
        minute, _ = _window(time.time() if now is None else now)
        self._forget_before(minute - 1)
        for limit in limits:
            if limit.tpm is None:
                continue
            if token_delta > 0:
                self._counts.setdefault((limit.scope, minute), [0, 0])[1] += token_delta
                continue
            # As in redis_scripts.SETTLE: drain this minute, then the previous one, never below zero.
            owed = -token_delta
            for counted_in in (minute, minute - 1):
                counts = self._counts.get((limit.scope, counted_in))
                if counts is not None:
                    take = min(counts[1], owed)
                    counts[1] -= take
                    owed -= take

    def _forget_before(self, minute: int) -> None:
        if minute > self._minute:
            self._counts = {key: counts for key, counts in self._counts.items() if key[1] >= minute}
            self._minute = minute


class RedisRateLimiter(RedisBacked):
    """Limits shared by every worker and replica using the same Redis.

    `redis` is a URL (the limiter then owns its client and closes it in aclose()) or a client from
    redis_guard.redis_client() shared with the budget ledger (closed by whoever made it).
    """

    WHAT = "rate limits"
    PREFIX = "gw:rl:"

    def __init__(self, redis: str | Redis, **options: Any) -> None:
        super().__init__(redis, **options)
        self._admit = self._redis.register_script(redis_scripts.ADMIT)
        self._settle = self._redis.register_script(redis_scripts.SETTLE)

    async def admit(self, limits: Sequence[Limit], tokens: int, now: float | None = None) -> Denied | None:
        active = _active(limits, tokens)
        if not active:
            return None
        minute, elapsed = _window(time.time() if now is None else now)
        args: list[Any] = [1 - elapsed / WINDOW_S, tokens, KEY_TTL_S]
        for limit in active:
            args += [-1 if cap is None else cap for cap in (limit.rpm, limit.tpm)]
        keys = self._keys(active, minute)
        try:
            verdict = await self._guard.call(lambda: self._admit(keys=keys, args=args))
        except RedisUnavailable:
            if self._guard.fail_open:
                return None
            return Denied(active[0].scope, "requests", 0, self._guard.retry_interval_s, "limiter_unavailable")
        if verdict is None:
            return None
        index, kind, cap, prev, cur = (int(n) for n in verdict)
        return _denied(active[index - 1].scope, kind - 1, cap, prev, cur, tokens, elapsed)

    async def settle(self, limits: Sequence[Limit], token_delta: int, now: float | None = None) -> None:
        active = [limit for limit in limits if limit.tpm is not None]
        if token_delta == 0 or not active:
            return
        minute, _ = _window(time.time() if now is None else now)
        keys = self._keys(active, minute)
        # A correction lost to an outage only skews one minute of counting: nothing to fail closed on.
        with contextlib.suppress(RedisUnavailable):
            await self._guard.call(lambda: self._settle(keys=keys, args=[token_delta, KEY_TTL_S]))

    def _keys(self, limits: Sequence[Limit], minute: int) -> list[str]:
        # The minute is the key's last field, so scopes containing ':' cannot collide.
        return [f"{self._prefix}{limit.scope}:{m}" for limit in limits for m in (minute, minute - 1)]
