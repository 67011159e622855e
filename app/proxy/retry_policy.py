"""When an upstream call is tried again, and after how long.

Mirrors openai-python's `_base_client` rules (408/409/429/5xx, `x-should-retry`, `retry-after-ms`
then `Retry-After`), with full-jitter exponential backoff between attempts, a cap on any wait the
upstream asks for, a maximum number of attempts and a deadline for the whole call.

Deliberate divergence from the SDKs: a failure is judged by how far the request got (`Phase`), not by
the exception's name. A request is sent again only when no byte of it can have reached the upstream,
or when the upstream answered with a retryable status; a request the gateway can replay (its whole body
in hand) also when the upstream closed the connection without an answer, as the SDKs do. A timeout
after the request went out never is: the upstream may still be working on it, and a resend would run
(and bill) it twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from email.utils import parsedate_to_datetime
from enum import Enum
from typing import Any, TypeVar

from pyreqwest.exceptions import (
    ConnectError,
    ConnectTimeoutError,
    DecodeError,
    NetworkError,
    PoolTimeoutError,
)
from tenacity import AsyncRetrying, RetryCallState, stop_after_attempt
from tenacity.retry import retry_base
from tenacity.stop import stop_base
from tenacity.wait import wait_base, wait_random_exponential

from app.config import Settings

log = logging.getLogger("gateway.upstream")

T = TypeVar("T")

RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


class UpstreamClosedEarly(ConnectionError):
    """The upstream ended a stream before its first byte."""


class Phase(Enum):
    """How far a failed attempt got: what decides whether its request may be sent again."""

    NOT_CONNECTED = "not_connected"  # no connection was made: not a byte of the request left
    CLOSED = "closed"  # the upstream closed the connection without a whole answer
    WAITING = "waiting"  # timed out after the request went out: the upstream may still be working on it


# pyreqwest names every failure before the response head "connect" (ConnectTimeoutError for an upstream
# that stalls after taking the whole request, ConnectError for one that hangs up on it), but it keeps
# reqwest's chain of causes. Only a failure inside the connector carries hyper-util's Connect error,
# which is reqwest's own test (`reqwest::Error::is_connect`). Should the message ever change, failures
# to connect would merely stop being retried: the safe side.
_CONNECT_CAUSE = "client error (Connect)"


def failure_phase(exc: BaseException) -> Phase | None:
    """The phase an attempt failed in; None for a failure that is not the upstream's (e.g. the client's
    upload broke off)."""
    if isinstance(exc, PoolTimeoutError):  # waited for one of the client's own connection slots
        return Phase.NOT_CONNECTED
    if isinstance(exc, (ConnectError, ConnectTimeoutError)) and any(
        cause["message"] == _CONNECT_CAUSE for cause in exc.details.get("causes") or ()
    ):
        return Phase.NOT_CONNECTED
    # pyreqwest's timeouts are TimeoutErrors, as is the gateway's own bound on an attempt.
    if isinstance(exc, TimeoutError):
        return Phase.WAITING
    # NetworkError: the connection closed or was reset; DecodeError: a body that broke off.
    if isinstance(exc, (NetworkError, DecodeError, UpstreamClosedEarly)):
        return Phase.CLOSED
    return None


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
    # openai-python asks `x-should-retry` only of a 4xx or 5xx: a success is the answer, billed, whatever
    # its headers say (retried, the call would run and be billed again, the first answer's usage lost).
    if status < 400:
        return False
    hint = headers.get("x-should-retry")
    if hint == "true":
        return True
    if hint == "false":
        return False
    return status in RETRYABLE_STATUSES


class _RetryOutcome(retry_base):
    def __init__(self, *, replayable: bool) -> None:
        self._replayable = replayable

    def retries_error(self, exc: BaseException) -> bool:
        phase = failure_phase(exc)
        return phase is Phase.NOT_CONNECTED or (self._replayable and phase is Phase.CLOSED)

    def retries_response(self, response: Any) -> bool:
        return self._replayable and is_retryable_status(response.status, response.headers)

    def __call__(self, retry_state: RetryCallState) -> bool:
        outcome = retry_state.outcome
        if outcome is None:
            return False
        if outcome.failed:
            exc = outcome.exception()
            return exc is not None and self.retries_error(exc)
        return self.retries_response(outcome.result())


class _PastDeadline(stop_base):
    """Stop when the next attempt would start at or after the deadline, the wait before it included: no
    sleep crosses the deadline only to give up at its end."""

    def __init__(self, deadline: float) -> None:
        self._deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        return time.perf_counter() + retry_state.upcoming_sleep >= self._deadline


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
        self._replayable = _RetryOutcome(replayable=True)
        # For requests that must not be sent twice: retry only failures to connect.
        self._not_replayable = _RetryOutcome(replayable=False)
        self._max_attempts = stop_after_attempt(settings.max_attempts)
        self._wait = _Wait(settings)

    async def run(
        self, attempt: Callable[[], Awaitable[T]], *, deadline: float, replayable: bool = True
    ) -> T:
        """Call `attempt` until it succeeds or the policy gives up; return its last result or raise its
        last error. No attempt starts, and no wait ends, at or after `deadline` (a `time.perf_counter()`
        value); bounding each attempt by it is `attempt`'s own job. A request that is not `replayable`
        is retried only when no connection could be made.

        The first attempt runs without tenacity, whose bookkeeping costs ~40 µs a call (measured) and
        is needed only once something failed; a retry replays that first outcome into tenacity, so the
        policy (attempt count, Retry-After, deadline) sees every attempt."""
        decide = self._replayable if replayable else self._not_replayable
        first: T | BaseException
        try:
            result = await attempt()
        except Exception as exc:
            if not decide.retries_error(exc):
                raise
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

        last: T = await self._retrying(decide, deadline)(replayed)
        return last

    def _retrying(self, retry: retry_base, deadline: float) -> AsyncRetrying:
        return AsyncRetrying(
            stop=self._max_attempts | _PastDeadline(deadline),
            wait=self._wait,
            retry=retry,
            before_sleep=_log_retry,
            retry_error_callback=_last_outcome,
        )
