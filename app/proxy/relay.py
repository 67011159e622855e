"""Forward one metered JSON call upstream — trying the model's fallbacks when its retries are spent — and
turn what comes back into the client's response."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, Callable, Mapping

from starlette.responses import Response
from starlette.types import Receive

from app.call.record import CallRecord
from app.errors import GatewayError, RelayedError
from app.proxy.answers import RelayedResponse
from app.proxy.client_watch import ClientWatch
from app.proxy.streaming import EventRelayResponse
from app.proxy.targets import Candidate, UpstreamTarget
from app.proxy.upstream import (
    ResponseHead,
    UpstreamClient,
    UpstreamResponse,
    UpstreamUnavailable,
    is_sse,
    never_open,
    upstream_request_headers,
    whereabouts,
)
from app.wire import openai
from app.wire.dialect import Dialect, EventInspector, Payload

log = logging.getLogger("gateway.relay")

ATTEMPTS_HEADER = "x-gateway-attempts"
MODEL_HEADER = "x-gateway-model"


def answer_headers(upstream: UpstreamClient, response: UpstreamResponse, call: CallRecord) -> dict[str, str]:
    """The headers every relayed answer carries: the upstream's that clients read, and the attempts."""
    return {**upstream.relay_headers(response), ATTEMPTS_HEADER: str(call.outcome.attempts)}


def upstream_error(
    upstream: UpstreamClient,
    target: UpstreamTarget,
    response: UpstreamResponse,
    call: CallRecord,
    dialect: Dialect = openai.JSON,
) -> Response:
    """The upstream's error, relayed: its status, body and rate-limit headers; `dialect` classifies it."""
    attempts = {ATTEMPTS_HEADER: str(call.outcome.attempts)}
    if response.status == 401:
        # The caller's key was accepted by the gateway; a 401 would blame it for the gateway's own key.
        call.outcome.error_type = "upstream_auth"
        where = whereabouts(target)
        unset = "" if where.key_set else " (it is not set)"
        raise GatewayError(
            502,
            f"The upstream at {where.host} rejected the gateway's own key: check {where.key_setting}{unset}. "
            "The gateway operator must fix it.",
            code="upstream_auth_failed",
            headers={**attempts, "x-should-retry": "false"},
        )
    call.outcome.error_type = dialect.error_type(response.status, response.body)
    return RelayedResponse(
        response.body,
        response.status,
        {**upstream.error_headers(response), **attempts},
        response.headers.get("content-type", "application/json"),
    )


def unavailable(upstream: UpstreamClient, exc: UpstreamUnavailable, call: CallRecord) -> GatewayError:
    call.outcome.error_type = f"upstream_{exc.kind}"
    headers = {ATTEMPTS_HEADER: str(call.outcome.attempts)}
    if upstream.suppress_client_retries:
        headers["x-should-retry"] = "false"
    return GatewayError(
        504 if exc.kind == "timeout" else 502, str(exc), code=call.outcome.error_type, headers=headers
    )


async def send_checked(
    upstream: UpstreamClient,
    call: CallRecord,
    target: UpstreamTarget,
    method: str,
    path: str,
    *,
    client_headers: Mapping[str, str],
    body: bytes | AsyncIterable[bytes] = b"",
    keep_open: Callable[[ResponseHead], bool] = never_open,
    replayable: bool = True,
    extra_headers: Mapping[str, str] | None = None,
    dialect: Dialect = openai.JSON,
) -> UpstreamResponse:
    """One upstream call (with retries) whose failures become the client's answer: an upstream error is
    relayed (RelayedError, classified by `dialect`), no answer at all is a 502/504 (GatewayError)."""
    try:
        answer = await upstream.send(
            target,
            method,
            path,
            body=body,
            headers={**upstream_request_headers(client_headers), **(extra_headers or {})},
            call=call,
            keep_open=keep_open,
            replayable=replayable,
        )
    except UpstreamUnavailable as exc:
        raise unavailable(upstream, exc, call) from None
    if answer.status >= 400:
        raise RelayedError(upstream_error(upstream, target, answer, call, dialect))
    return answer


def _falls_back(response: UpstreamResponse) -> bool:
    return response.status == 429 or response.status >= 500


async def forward(
    upstream: UpstreamClient,
    call: CallRecord,
    candidates: list[Candidate],
    *,
    path: str,
    payload: Payload,
    dialect: Dialect,
    client_headers: Mapping[str, str],
    inspector: Callable[[], EventInspector] | None,
    receive: Receive,
    clients: ClientWatch,
) -> Response:
    """POST `payload` to `path` for each candidate model in turn until one answers; relay JSON whole, or
    an SSE stream event by event when `inspector` is given (made once the upstream answered a stream).
    `dialect` reads the JSON answer and classifies an error.

    A client that leaves while the upstream works on its call is noticed (app/proxy/client_watch.py); the call
    still waits for the answer, which the upstream bills, so that its row has the real usage, then answers
    nobody: 499, `client_disconnected`, and no fallback or further model is tried for it."""
    headers = {**upstream_request_headers(client_headers), "content-type": "application/json"}
    keep_open = is_sse if inspector is not None else never_open
    clients.enter(receive, call)
    try:
        for index, candidate in enumerate(candidates):
            last = index == len(candidates) - 1
            try:
                response = await upstream.send(
                    candidate.target,
                    "POST",
                    path,
                    body=payload.for_model(candidate.model),
                    headers=headers,
                    call=call,
                    keep_open=keep_open,
                )
            except UpstreamUnavailable as exc:
                if call.outcome.client_disconnected:
                    return _abandoned()
                if last:
                    raise unavailable(upstream, exc, call) from None
                log.warning("falling back", extra={"from_model": candidate.model, "reason": exc.kind})
                continue
            if call.outcome.client_disconnected:
                call.outcome.routed_model = candidate.model
                return await _abandoned_answer(call, response, dialect)
            if response.status >= 400:
                if last or not _falls_back(response):
                    return upstream_error(upstream, candidate.target, response, call, dialect)
                log.warning("falling back", extra={"from_model": candidate.model, "reason": response.status})
                continue
            call.outcome.routed_model = candidate.model
            return _answer(upstream, call, response, dialect, inspector)
        raise AssertionError("forward() needs at least one candidate")
    finally:
        clients.leave(receive)


def _abandoned() -> Response:
    # As nginx logs it: the send goes nowhere, but the access log and the usage row record it.
    return Response(status_code=499)


async def _abandoned_answer(call: CallRecord, response: UpstreamResponse, dialect: Dialect) -> Response:
    """The answer to a call whose client has gone: its usage is kept (the upstream billed it); a stream is
    closed at once, so the upstream stops generating."""
    if response.stream is not None:
        await response.stream.close()
    elif response.status < 400:
        dialect.read_answer(call.outcome, response.body)
    return _abandoned()


def _answer(
    upstream: UpstreamClient,
    call: CallRecord,
    response: UpstreamResponse,
    dialect: Dialect,
    inspector: Callable[[], EventInspector] | None,
) -> Response:
    headers = {**answer_headers(upstream, response, call), MODEL_HEADER: call.outcome.routed_model or ""}
    if response.stream is None:
        dialect.read_answer(call.outcome, response.body)
        call.mark_first_byte()
        return RelayedResponse(
            response.body,
            response.status,
            headers,
            response.headers.get("content-type", "application/json"),
        )
    assert inspector is not None
    return EventRelayResponse(response, call, inspector(), headers, upstream.max_event_bytes)
