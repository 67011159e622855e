"""What every metered JSON endpoint does before it forwards, one step each in the order of the data path:
read and parse the body, attribute the call, resolve the model to its candidates, fit the prompt to the
feature's budget, and admit the call against its limits."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.responses import Response

from app.access.attribution import attribute
from app.config_file import FeatureConfig
from app.limits import estimate
from app.limits.guard import completion_allowance, worst_case_output
from app.limits.prompt_budget import fit_prompt
from app.proxy.body import parse_object, read_body
from app.proxy.relay import forward
from app.proxy.streaming import KeepAliveResponse
from app.proxy.targets import Candidate
from app.routes.deps import Gateway
from app.wire.dialect import Dialect, StreamDialect
from app.wire.endpoints import MeteredEndpoint


@dataclass(slots=True)
class MeteredRequest:
    raw: bytes
    body: dict[str, Any]
    candidates: list[Candidate]
    # The body differs from the client's bytes (messages dropped to fit the prompt budget).
    modified: bool = False


def _no_check(_: dict[str, Any]) -> None:
    return None


async def read_metered(
    request: Request,
    gw: Gateway,
    endpoint: MeteredEndpoint[Dialect],
    check: Callable[[dict[str, Any]], None] = _no_check,
    owned: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
) -> MeteredRequest:
    """Raises the 4xx for bad input before the call counts as metered: rejected input leaves no row.
    `check` is the endpoint's own check of its body; `owned` refuses a body naming objects that are not
    the caller's (app.ownership).

    Each step is awaited only when it has something to wait for: this runs on every metered call, and a
    coroutine made and awaited for nothing costs about half a microsecond."""
    call = gw.call
    admitted = call.admitted
    raw, body = await _read(request, gw)
    attribute(call, gw.headers, body)
    asked = _ask(gw, body, check)
    if owned is not None:
        await owned(body)
    candidates = gw.policy.candidates(asked, admitted.feature, admitted.key)
    model = candidates[0].model
    rules = _prompt_budget(gw, endpoint)
    prompt_tokens = await _fit_prompt(gw, rules, body, model) if rules is not None else None
    if gw.services.guard.concerns(call):
        await _admit(gw, endpoint, raw, body, model, prompt_tokens)
    # Only now is it a metered call: what metering needs to count it, should the upstream not say.
    admitted.endpoint, admitted.request_body = endpoint.path, body
    admitted.stream = endpoint.dialect.streamed(body)
    return MeteredRequest(raw, body, candidates, modified=admitted.prompt_truncated)


async def _read(request: Request, gw: Gateway) -> tuple[bytes, dict[str, Any]]:
    """The body within its size limit, and the JSON object it must be."""
    headers = gw.headers
    raw = await read_body(
        request, gw.settings.max_body_bytes, headers.get("content-length"), headers.get("content-encoding")
    )
    return raw, parse_object(raw)


def _ask(gw: Gateway, body: dict[str, Any], check: Callable[[dict[str, Any]], None]) -> str:
    """The model asked for (the body's, or the feature's default), once the endpoint has checked the
    body; the policy resolves it to its upstream candidates after the ownership check."""
    admitted = gw.call.admitted
    model = admitted.model = gw.policy.requested_model(body.get("model"), admitted.feature)
    check(body)
    return model


def _prompt_budget(gw: Gateway, endpoint: MeteredEndpoint[Dialect]) -> FeatureConfig | None:
    """The feature's rules when they set a prompt budget and the endpoint takes one (chat), else None."""
    feature = gw.call.admitted.feature
    if feature is None or not endpoint.prompt_budget:
        return None
    rules = gw.policy.config.features.get(feature)
    return rules if rules is not None and rules.max_prompt_tokens is not None else None


async def _fit_prompt(gw: Gateway, rules: FeatureConfig, body: dict[str, Any], model: str) -> int:
    """The prompt's tokens, counted, with old messages dropped or the call refused when over budget."""
    admitted = gw.call.admitted
    assert rules.max_prompt_tokens is not None
    fitted = await asyncio.to_thread(
        fit_prompt,
        model,
        body,
        rules.max_prompt_tokens,
        truncate=rules.prompt_overflow == "truncate",
        feature=admitted.feature or "",
    )
    body["messages"] = fitted.messages
    admitted.prompt_truncated = fitted.truncated
    return fitted.prompt_tokens


async def _admit(
    gw: Gateway,
    endpoint: MeteredEndpoint[Dialect],
    raw: bytes,
    body: dict[str, Any],
    model: str,
    prompt_tokens: int | None,
) -> None:
    """Admitted against the rate limits and budgets that concern the call, reserving its worst case: the
    prompt (counted when a prompt budget did, else estimated from its bytes) and the most output."""
    call, config = gw.call, gw.policy.config

    def sizes() -> tuple[int, int, int]:
        prompt = estimate.prompt_tokens(raw) if prompt_tokens is None else prompt_tokens
        # An endpoint without output (embeddings) reserves none, whatever the default output cap.
        worst = worst_case_output(body, config, call.admitted.feature, model) if endpoint.output_tokens else 0
        return prompt, completion_allowance(body), worst

    call.admitted.admission = await gw.services.guard.admit(call, config, gw.prices, model, sizes)


async def forward_metered(
    request: Request,
    gw: Gateway,
    endpoint: MeteredEndpoint[StreamDialect],
    metered: MeteredRequest,
    answered: Callable[[Response], Awaitable[None] | None],
) -> Response:
    """Forward a metered request whose answer may be a stream: the body its dialect sends upstream, the
    answer relayed (a stream event by event, read by the dialect's inspector, with keep-alives while it
    is awaited), and `answered` told of the response before it goes to the client."""
    call = gw.call
    stream = call.admitted.stream
    dialect = endpoint.dialect
    payload = dialect.payload(metered.raw, metered.body, modified=metered.modified, stream=stream)

    async def answer() -> Response:
        response = await forward(
            gw.upstream,
            call,
            metered.candidates,
            path=endpoint.upstream_path,
            payload=payload,
            dialect=dialect,
            client_headers=gw.headers,
            inspector=(lambda: dialect.inspector(call.outcome, payload)) if stream else None,
            receive=request.receive,
            clients=gw.services.client_watch,
        )
        recording = answered(response)
        if recording is not None:
            await recording
        return response

    keepalives = gw.services.keepalives
    if stream and keepalives.interval_s:
        # Keep-alive comments go out while the answer is awaited, unless they are off
        # (GATEWAY_SSE_KEEPALIVE_S=0).
        return KeepAliveResponse(answer(), call, keepalives)
    return await answer()
