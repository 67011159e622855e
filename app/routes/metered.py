"""What every metered JSON endpoint does before it forwards, one step each in the order of the data path:
read and parse the body, attribute the call, resolve the model to its candidates, fit the prompt to the
feature's budget, and admit the call against its limits."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from app.access.attribution import attribute
from app.access.deps import Gateway
from app.limits import estimate
from app.limits.guard import completion_allowance, worst_case_output
from app.limits.policy import Candidate
from app.limits.prompt_budget import fit_prompt
from app.proxy.body import parse_object, read_body
from app.wire.dialect import Dialect
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
    the caller's (app.ownership)."""
    call = gw.call
    raw, body = await _read(request, gw)
    attribute(call, gw.headers, body)
    candidates = await _resolve(gw, body, check, owned)
    model = candidates[0].model
    prompt_tokens = await _fit_prompt_budget(gw, endpoint, raw, body, model)
    await _admit(gw, endpoint, body, model, prompt_tokens)
    # Only now is it a metered call: what metering needs to count it, should the upstream not say.
    admitted = call.admitted
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


async def _resolve(
    gw: Gateway,
    body: dict[str, Any],
    check: Callable[[dict[str, Any]], None],
    owned: Callable[[dict[str, Any]], Awaitable[None]] | None,
) -> list[Candidate]:
    """The model asked for (the body's, or the feature's default) and the upstream candidates the policy
    resolves it to, once the endpoint has checked the body."""
    policy, admitted = gw.policy, gw.call.admitted
    admitted.model = policy.requested_model(body.get("model"), admitted.feature)
    check(body)
    if owned is not None:
        await owned(body)
    return policy.candidates(admitted.model, admitted.feature, admitted.key)


async def _fit_prompt_budget(
    gw: Gateway, endpoint: MeteredEndpoint[Dialect], raw: bytes, body: dict[str, Any], model: str
) -> int:
    """The prompt's tokens: counted, and old messages dropped or the call refused, when the feature has
    a prompt budget and the endpoint takes one (chat); otherwise estimated from its size."""
    admitted = gw.call.admitted
    rules = gw.policy.config.features.get(admitted.feature) if admitted.feature is not None else None
    if rules is None or rules.max_prompt_tokens is None or not endpoint.prompt_budget:
        return estimate.prompt_tokens(raw)
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
    gw: Gateway, endpoint: MeteredEndpoint[Dialect], body: dict[str, Any], model: str, prompt_tokens: int
) -> None:
    """Admitted against the rate limits and budgets that concern the call, reserving its worst case."""
    call, policy = gw.call, gw.policy
    guard = gw.services.guard
    if not guard.concerns(call):
        return
    # An endpoint without output (embeddings) reserves none, whatever the default output cap.
    worst = (
        worst_case_output(body, policy.config, call.admitted.feature, model) if endpoint.output_tokens else 0
    )
    call.admitted.admission = await guard.admit(
        call, policy.config, gw.prices, model, prompt_tokens, completion_allowance(body), worst
    )
