"""The Redis edge shared by the rate limiter and the budget ledger.

Both sit on the request path, so no Redis call may take longer than a short deadline, and an outage
must not cost that deadline on every request: after a failure, calls skip Redis for
`retry_interval_s`, then a single call probes it again. redis-py drops a broken connection and dials
a new one on the next call, and its Script objects reload a script the server has forgotten
(NOSCRIPT after a restart), so recovery needs nothing more than the probe succeeding.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

log = logging.getLogger("gateway.limits")

T = TypeVar("T")


class RedisUnavailable(Exception):
    """Redis did not answer in time or answered with an error; the caller applies its fail mode."""


def redis_client(url: str, *, timeout_s: float = 0.05, max_connections: int = 64) -> Redis:
    """A client for the limits: one per process, made in the lifespan and shared by both limiters."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        # Waiting for a pooled connection counts against the caller's deadline like the call does.
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        # redis-py retries 3 times with backoff by default: far past a 50 ms deadline. The guard's
        # probe interval is the retry policy here.
        retry=Retry(NoBackoff(), 0),
    )
    return Redis.from_pool(pool)


class RedisGuard:
    """Runs Redis calls under a deadline and tracks outages for metrics and logs."""

    def __init__(self, what: str, *, fail_open: bool, timeout_s: float, retry_interval_s: float) -> None:
        self.what = what
        self.fail_open = fail_open
        self.timeout_s = timeout_s
        self.retry_interval_s = retry_interval_s
        self.degraded = False
        self.redis_errors = 0
        self.unchecked = 0
        self._probe_at = 0.0

    async def call(self, fn: Callable[[], Awaitable[T]], *, timeout_s: float | None = None) -> T:
        if self.degraded:
            now = time.monotonic()
            if now < self._probe_at:
                self.unchecked += 1
                raise RedisUnavailable(f"{self.what}: Redis unavailable")
            # This call alone probes; calls arriving while it waits skip Redis as before.
            self._probe_at = now + self.retry_interval_s
        try:
            async with asyncio.timeout(self.timeout_s if timeout_s is None else timeout_s):
                result = await fn()
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            raise RedisUnavailable(f"{self.what}: {exc!r}") from exc
        if self.degraded:
            self.degraded = False
            log.warning("%s: Redis answers again; limits enforced", self.what)
        return result

    def _failed(self, exc: BaseException) -> None:
        self.redis_errors += 1
        self.unchecked += 1
        self._probe_at = time.monotonic() + self.retry_interval_s
        if not self.degraded:
            self.degraded = True
            mode = "admitting" if self.fail_open else "refusing"
            log.warning("%s: Redis unavailable (%r); %s requests until it answers", self.what, exc, mode)


class RedisBacked:
    """What the Redis rate limiter and budget ledger share: a client (owned when made from a URL, else
    shared and closed by whoever made it), a key prefix, and the guard that decides their fail mode."""

    WHAT = "redis"  # what the logs call it
    PREFIX = "gw:"  # its keys' prefix

    def __init__(
        self,
        redis: str | Redis,
        *,
        fail_open: bool = True,
        timeout_s: float = 0.05,
        prefix: str | None = None,
        retry_interval_s: float = 1.0,
    ) -> None:
        self._owned = isinstance(redis, str)
        self._redis = redis_client(redis, timeout_s=timeout_s) if isinstance(redis, str) else redis
        self._prefix = self.PREFIX if prefix is None else prefix
        self._guard = RedisGuard(
            self.WHAT, fail_open=fail_open, timeout_s=timeout_s, retry_interval_s=retry_interval_s
        )

    @property
    def degraded(self) -> bool:
        return self._guard.degraded

    @property
    def redis_errors(self) -> int:
        return self._guard.redis_errors

    @property
    def unchecked(self) -> int:
        """Calls decided by the fail mode (and budget charges lost) instead of going to Redis."""
        return self._guard.unchecked

    async def aclose(self) -> None:
        if self._owned:
            await self._redis.aclose()


class InProcess:
    """What the in-process rate limiter and budget ledger report where the Redis-backed ones have a guard."""

    degraded = False
    redis_errors = 0

    async def aclose(self) -> None:
        return None
