"""What every metered JSON endpoint does before it forwards: read and parse the body, attribute the call,
and resolve the model through the policy."""

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
    endpoint: str,
    check: Callable[[dict[str, Any]], None] = _no_check,
    owned: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
) -> MeteredRequest:
    """Raises the 4xx for bad input before the call counts as metered: rejected input leaves no row.
    `owned` refuses a body naming objects that are not the caller's (app.ownership)."""
    call, policy = gw.call, gw.policy
    headers = gw.headers
    raw = await read_body(
        request, gw.settings.max_body_bytes, headers.get("content-length"), headers.get("content-encoding")
    )
    body = parse_object(raw)
    attribute(call, gw.headers, body)
    call.model = policy.requested_model(body.get("model"), call.feature)
    check(body)
    if owned is not None:
        await owned(body)
    candidates = policy.candidates(call.model, call.feature, call.key)
    model = candidates[0].model
    rules = policy.config.features.get(call.feature) if call.feature is not None else None
    prompt_tokens = estimate.prompt_tokens(raw)
    if rules is not None and rules.max_prompt_tokens is not None and endpoint == "/v1/chat/completions":
        fitted = await asyncio.to_thread(
            fit_prompt,
            model,
            body,
            rules.max_prompt_tokens,
            truncate=rules.prompt_overflow == "truncate",
            feature=call.feature or "",
        )
        body["messages"] = fitted.messages
        call.prompt_truncated = fitted.truncated
        prompt_tokens = fitted.prompt_tokens
    state = request.app.state
    guard = state.guard
    if guard.concerns(call):
        # Embeddings produce no output tokens, whatever the default output cap.
        worst = (
            0 if endpoint == "/v1/embeddings" else worst_case_output(body, policy.config, call.feature, model)
        )
        call.admission = await guard.admit(
            call, policy.config, state.prices, model, prompt_tokens, completion_allowance(body), worst
        )
    call.endpoint = endpoint
    call.request_body = body
    call.stream = body.get("stream") is True
    return MeteredRequest(raw, body, candidates, modified=call.prompt_truncated)
