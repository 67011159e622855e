"""When an upstream call is tried again, and after how long.

Mirrors openai-python's `_base_client` rules (408/409/429/5xx, `x-should-retry`, `retry-after-ms`
then `Retry-After`), with full-jitter exponential backoff between attempts, a cap on any wait the
upstream asks for, a maximum number of attempts and a deadline after which no attempt starts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

from pyreqwest.exceptions import (
    ConnectError,
    ConnectTimeoutError,
    DecodeError,
    PoolTimeoutError,
    TransportError,
)
from tenacity import AsyncRetrying, RetryCallState, stop_after_attempt, stop_before_delay
from tenacity.retry import retry_base
from tenacity.wait import wait_base, wait_random_exponential

from app.config import Settings

log = logging.getLogger("gateway.upstream")

T = TypeVar("T")

RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


class UpstreamClosedEarly(ConnectionError):
    """The upstream ended a stream before its first byte."""


# A stream's first byte is read inside the attempt, so a drop before it is still a retryable failure.
# (TransportError: connection, read and write failures and timeouts; DecodeError: a body that broke off.)
RETRYABLE_ERRORS = (TransportError, DecodeError, UpstreamClosedEarly, asyncio.TimeoutError)


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The wait the upstream asked for, in seconds: `retry-after-ms` first, then `Retry-After` as
    seconds or as an HTTP date."""
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(float(value) / 1000, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


def is_retryable_status(status: int, headers: Mapping[str, str]) -> bool:
    hint = headers.get("x-should-retry")
    if hint == "true":
        return True
    if hint == "false":
        return False
    return status in RETRYABLE_STATUSES


# Failures that happen before a connection exists: not a byte of the request has left.
BEFORE_CONNECT_ERRORS = (ConnectError, ConnectTimeoutError, PoolTimeoutError)


class _RetryOutcome(retry_base):
    def __init__(self, errors: tuple[type[BaseException], ...], responses: bool) -> None:
        self.errors = errors
        self._responses = responses

    def retries_response(self, response: Any) -> bool:
        return self._responses and is_retryable_status(response.status, response.headers)

    def __call__(self, retry_state: RetryCallState) -> bool:
        outcome = retry_state.outcome
        if outcome is None:
            return False
        if outcome.failed:
            return isinstance(outcome.exception(), self.errors)
        return self.retries_response(outcome.result())


class _Wait(wait_base):
    def __init__(self, settings: Settings) -> None:
        self._backoff = wait_random_exponential(
            multiplier=settings.backoff_initial_s, max=settings.backoff_max_s
        )
        self._cap = settings.retry_after_max_s

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        if outcome is not None and not outcome.failed:
            asked = retry_after_s(outcome.result().headers)
            if asked is not None:
                return min(asked, self._cap)
        return float(self._backoff(retry_state))


def _log_retry(retry_state: RetryCallState) -> None:
    outcome = retry_state.outcome
    assert outcome is not None
    failure = type(outcome.exception()).__name__ if outcome.failed else f"status {outcome.result().status}"
    log.info(
        "retrying upstream call",
        extra={
            "attempt": retry_state.attempt_number,
            "failure": failure,
            "sleep_s": round(retry_state.upcoming_sleep, 3),
        },
    )


def _last_outcome(retry_state: RetryCallState) -> object:
    # Exhausted on a response: hand back the last response (its status and body go to the client).
    # Exhausted on an exception: re-raise it.
    assert retry_state.outcome is not None
    return retry_state.outcome.result()


class RetryPolicy:
    def __init__(self, settings: Settings) -> None:
        self.max_attempts = settings.max_attempts
        self._any_failure = _RetryOutcome(RETRYABLE_ERRORS, responses=True)
        # For requests that must not be sent twice: retry only failures to connect.
        self._before_connect = _RetryOutcome(BEFORE_CONNECT_ERRORS, responses=False)
        self._stop = stop_after_attempt(settings.max_attempts) | stop_before_delay(settings.retry_deadline_s)
        self._wait = _Wait(settings)

    async def run(self, attempt: Callable[[], Awaitable[T]], *, replayable: bool = True) -> T:
        """Call `attempt` until it succeeds or the policy gives up; return its last result or raise its
        last error. A request that is not `replayable` is retried only when no connection could be made.

        The first attempt runs without tenacity, whose bookkeeping costs ~40 µs a call (measured) and
        is needed only once something failed; a retry replays that first outcome into tenacity, so the
        policy (attempt count, Retry-After, deadline) sees every attempt."""
        decide = self._any_failure if replayable else self._before_connect
        first: T | BaseException
        try:
            result = await attempt()
        except decide.errors as exc:
            first = exc
        else:
            if not decide.retries_response(result):
                return result
            first = result
        replay = [first]

        async def replayed() -> T:
            if replay:
                outcome = replay.pop()
                if isinstance(outcome, BaseException):
                    raise outcome
                return outcome
            return await attempt()

        last: T = await self._retrying(decide)(replayed)
        return last

    def _retrying(self, retry: retry_base) -> AsyncRetrying:
        return AsyncRetrying(
            stop=self._stop,
            wait=self._wait,
            retry=retry,
            before_sleep=_log_retry,
            retry_error_callback=_last_outcome,
        )
