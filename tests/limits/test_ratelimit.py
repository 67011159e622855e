"""The rate limiters against a real Redis and real processes; time comes from an injected clock."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from app.call.admission import Limit
from app.limits import Denied, InProcessRateLimiter, RateLimiter, RedisRateLimiter, redis_client
from tests.limits import (
    CLOSED_URL,
    REDIS_URL,
    RedisServer,
    eventually,
    hung_server,
    run_workers,
    unique_prefix,
)

# The start of an epoch minute, so offsets from it are the seconds elapsed in the minute.
T0 = 1_800_000_000.0


@pytest.fixture(params=["in-process", "redis"])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[RateLimiter]:
    made: RateLimiter
    if request.param == "redis":
        made = RedisRateLimiter(REDIS_URL, prefix=unique_prefix("rl"), timeout_s=1.0)
    else:
        made = InProcessRateLimiter()
    yield made
    assert not made.degraded
    await made.aclose()


async def admitted(
    limiter: RateLimiter, limits: list[Limit], attempts: int, now: float, tokens: int = 0
) -> int:
    return sum([await limiter.admit(limits, tokens, now) is None for _ in range(attempts)])


async def test_admits_exactly_the_rpm_and_says_when_to_retry(limiter: RateLimiter) -> None:
    limits = [Limit("key:a", rpm=5, tpm=None)]
    assert await admitted(limiter, limits, 8, T0 + 10) == 5

    denied = await limiter.admit(limits, 0, T0 + 10)
    # Next minute, 5 * (1 - 12/60) + 1 = 5 fits: 50 s to the turn of the minute, then 12 s.
    assert denied == Denied("key:a", "requests", 5, 62.0)
    assert denied.retry_after_header == "62"
    assert await limiter.admit(limits, 0, T0 + 60 + 11.9) is not None
    assert await limiter.admit(limits, 0, T0 + 60 + 12) is None


async def test_concurrent_admits_in_one_process_stop_at_the_limit(limiter: RateLimiter) -> None:
    limits = [Limit("key:a", rpm=50, tpm=None)]
    results = await asyncio.gather(*(limiter.admit(limits, 0, T0 + 1) for _ in range(80)))
    assert sum(result is None for result in results) == 50


async def test_the_window_slides_as_the_previous_minute_weighs_less(limiter: RateLimiter) -> None:
    limits = [Limit("feature:search", rpm=10, tpm=None)]
    assert await admitted(limiter, limits, 10, T0 + 59) == 10
    # The turn of the minute frees nothing: the previous minute still weighs 1.
    assert await admitted(limiter, limits, 1, T0 + 60) == 0
    # Half-way through it weighs 0.5: 10 * 0.5 = 5 estimated, room for 5.
    assert await admitted(limiter, limits, 10, T0 + 90) == 5
    # A minute on, those 5 are the whole previous minute, at full weight.
    assert await admitted(limiter, limits, 10, T0 + 120) == 5
    # A minute with no requests before it: the full 10 again.
    assert await admitted(limiter, limits, 20, T0 + 240) == 10


async def test_tokens_are_reserved_at_admission_and_corrected_by_settle(limiter: RateLimiter) -> None:
    limits = [Limit("user:u-1", rpm=None, tpm=1000)]
    assert await limiter.admit(limits, 600, T0 + 1) is None
    denied = await limiter.admit(limits, 600, T0 + 2)
    assert denied is not None
    assert (denied.scope, denied.kind, denied.limit) == ("user:u-1", "tokens", 1000)

    await limiter.settle(limits, 200 - 600, T0 + 3)  # the call used 200 tokens, not 600
    assert await limiter.admit(limits, 600, T0 + 4) is None  # 800 counted
    assert await limiter.admit(limits, 300, T0 + 5) is not None
    await limiter.settle(limits, +150, T0 + 6)  # this one used 750 tokens: 950 counted
    assert await limiter.admit(limits, 51, T0 + 7) is not None
    assert await limiter.admit(limits, 50, T0 + 7) is None


async def test_a_refund_never_takes_a_count_below_zero(limiter: RateLimiter) -> None:
    limits = [Limit("user:u-1", rpm=None, tpm=1000)]
    assert await limiter.admit(limits, 100, T0 + 1) is None
    await limiter.settle(limits, -10_000, T0 + 2)
    assert await admitted(limiter, limits, 2, T0 + 3, tokens=1000) == 1


async def test_a_refund_after_the_turn_of_the_minute_reaches_the_reservation(limiter: RateLimiter) -> None:
    limits = [Limit("user:u-1", rpm=None, tpm=1000)]
    assert await limiter.admit(limits, 1000, T0 + 59) is None
    await limiter.settle(limits, -1000, T0 + 61)  # the call straddled the minute and used nothing
    assert await limiter.admit(limits, 1000, T0 + 61) is None


async def test_a_denial_on_one_limit_counts_nothing_on_the_others(limiter: RateLimiter) -> None:
    key = Limit("key:a", rpm=3, tpm=1000)
    user = Limit("user:u-1", rpm=2, tpm=None)
    assert await admitted(limiter, [key, user], 5, T0 + 1, tokens=100) == 2
    denied = await limiter.admit([key, user], 100, T0 + 1)
    assert denied is not None
    assert denied.scope == "user:u-1"
    # The key saw 2 requests and 200 tokens, not 7 and 700: one request and 800 tokens are left.
    assert await limiter.admit([key], 801, T0 + 2) is not None
    assert await limiter.admit([key], 800, T0 + 2) is None
    assert await limiter.admit([key], 0, T0 + 2) is not None


async def test_a_request_larger_than_the_limit_can_never_be_admitted(limiter: RateLimiter) -> None:
    denied = await limiter.admit([Limit("key:a", rpm=None, tpm=100)], 101, T0)
    assert denied is not None
    assert denied.kind == "tokens"
    assert math.isinf(denied.retry_after_s)
    assert denied.retry_after_header is None
    assert await limiter.admit([Limit("key:b", rpm=0, tpm=None)], 0, T0) is not None


async def test_limits_without_caps_are_ignored(limiter: RateLimiter) -> None:
    assert await limiter.admit([], 10**9, T0) is None
    assert await admitted(limiter, [Limit("key:a", rpm=None, tpm=None)], 100, T0) == 100


@pytest.mark.parametrize(("seconds", "header"), [(0.2, "1"), (1.0, "1"), (1.01, "2"), (62.0, "62")])
def test_retry_after_header_is_whole_seconds_rounded_up_and_at_least_one(seconds: float, header: str) -> None:
    assert Denied("key:a", "requests", 1, seconds).retry_after_header == header


def test_negative_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        Limit("key:a", rpm=-1, tpm=None)


async def test_in_process_counters_keep_only_the_minutes_still_read() -> None:
    limiter = InProcessRateLimiter()
    for n in range(100):
        await limiter.admit([Limit(f"user:{n}", rpm=10, tpm=None)], 0, T0)
    await limiter.admit([Limit("user:late", rpm=10, tpm=None)], 0, T0 + 120)
    assert len(limiter._counts) == 1


async def test_redis_keys_expire_by_themselves() -> None:
    prefix = unique_prefix("rl")
    limiter = RedisRateLimiter(REDIS_URL, prefix=prefix, timeout_s=1.0)
    client = Redis.from_url(REDIS_URL)
    try:
        await limiter.admit([Limit("key:a", rpm=10, tpm=None)], 5, T0)
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        assert keys == [f"{prefix}key:a:{int(T0 // 60)}".encode()]
        assert 0 < await client.ttl(keys[0]) <= 120
    finally:
        await client.aclose()
        await limiter.aclose()


WORKER = """
import asyncio, sys
from app.call.admission import Limit
from app.limits import RedisRateLimiter

async def main(url, prefix, now, tasks, attempts):
    # Generous deadline and fail-closed: an admission by timeout would hide a miscount.
    limiter = RedisRateLimiter(url, prefix=prefix, timeout_s=5.0, fail_open=False)
    limits = [Limit("key:shared", rpm=1000, tpm=None)]

    async def hammer():
        return [await limiter.admit(limits, 0, now) for _ in range(attempts)]

    # Open the pooled connections and load the script before the start, so both processes race.
    warm_up = [Limit("key:warm-up", rpm=10**9, tpm=None)]
    await asyncio.gather(*(limiter.admit(warm_up, 0, now) for _ in range(tasks)))
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    results = [r for rs in await asyncio.gather(*(hammer() for _ in range(tasks))) for r in rs]
    unavailable = sum(r is not None and r.reason == "limiter_unavailable" for r in results)
    print(sum(r is None for r in results), unavailable)
    await limiter.aclose()

asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])))
"""


async def test_two_processes_sharing_redis_admit_exactly_the_limit_in_total() -> None:
    # 2 processes x 8 connections x 150 attempts at one rpm=1000 limit.
    lines = await run_workers(WORKER, REDIS_URL, unique_prefix("rl"), str(T0 + 30), "8", "150")
    counts = [tuple(map(int, line.split())) for line in lines]
    assert [unavailable for _, unavailable in counts] == [0, 0]
    assert sum(admitted for admitted, _ in counts) == 1000
    # Both took part in the race, or it proved nothing about atomicity across processes.
    assert all(admitted > 0 for admitted, _ in counts)


async def test_unreachable_redis_fails_open_quickly_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    # retry_interval_s=0: every call tries Redis again, and still the outage is logged once.
    limiter = RedisRateLimiter(CLOSED_URL, retry_interval_s=0)
    limits = [Limit("key:a", rpm=1, tpm=None)]
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.limits"):
            started = time.perf_counter()
            assert await limiter.admit(limits, 0) is None
            assert time.perf_counter() - started < 0.1
            assert limiter.degraded
            for _ in range(20):
                assert await limiter.admit(limits, 0) is None
        assert limiter.redis_errors == 21
        assert len(caplog.records) == 1
        assert "admitting" in caplog.records[0].getMessage()
    finally:
        await limiter.aclose()


async def test_unreachable_redis_fails_closed_with_a_reason() -> None:
    limiter = RedisRateLimiter(CLOSED_URL, fail_open=False)
    limits = [Limit("key:a", rpm=100, tpm=None)]
    try:
        started = time.perf_counter()
        denied = await limiter.admit(limits, 0)
        assert time.perf_counter() - started < 0.1
        assert denied == Denied("key:a", "requests", 0, 1.0, "limiter_unavailable")
        assert denied.retry_after_header == "1"
        # Within the retry interval, Redis is not tried again.
        assert await limiter.admit(limits, 0) == denied
        assert (limiter.redis_errors, limiter.unchecked) == (1, 2)
    finally:
        await limiter.aclose()


async def test_a_hung_redis_costs_one_deadline_then_nothing() -> None:
    async with hung_server() as url:
        limiter = RedisRateLimiter(url, timeout_s=0.05)
        limits = [Limit("key:a", rpm=1, tpm=None)]
        try:
            started = time.perf_counter()
            assert await limiter.admit(limits, 0) is None
            assert 0.04 < time.perf_counter() - started < 0.15
            started = time.perf_counter()
            assert await limiter.admit(limits, 0) is None
            assert time.perf_counter() - started < 0.01
            assert limiter.degraded
        finally:
            await limiter.aclose()


@pytest.mark.skipif(not RedisServer.available(), reason="needs redis-server on PATH")
async def test_limits_resume_when_redis_comes_back() -> None:
    server = RedisServer()
    await server.start()
    # A shared client, as the gateway's lifespan makes it.
    client = redis_client(server.url, timeout_s=0.5)
    limiter = RedisRateLimiter(client, timeout_s=0.5, retry_interval_s=0)
    limits = [Limit("key:a", rpm=2, tpm=None)]
    try:
        assert await limiter.admit(limits, 0, T0) is None
        await server.stop()
        assert await limiter.admit(limits, 0, T0) is None
        assert limiter.degraded

        # The new server has no counters and no scripts: EVALSHA's NOSCRIPT must reload the script.
        await server.start()

        async def recovered() -> bool:
            return await limiter.admit(limits, 0, T0) is None and not limiter.degraded

        await eventually(recovered)
        assert await limiter.admit(limits, 0, T0) is None
        assert await limiter.admit(limits, 0, T0) is not None
    finally:
        await limiter.aclose()
        await client.aclose()
        await server.stop()
