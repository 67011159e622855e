"""Turn what a call learned (CallRecord) into the one usage event the recorder persists."""

from __future__ import annotations

import logging
from typing import Any

from app.call.record import CallRecord, Usage
from app.db.events import UsageSource, line
from app.metering import tokens
from app.metering.pricing import Priced
from app.wire import endpoints

log = logging.getLogger("gateway.metering")

UPSTREAM: UsageSource = "upstream"


def estimated_with(call: CallRecord) -> str | None:
    """The model whose tokenizer counts the call's tokens, when the gateway must count them itself: the
    upstream did (or may have) generated tokens without saying how many — a 2xx without usage, a call
    the client abandoned, or a stream the upstream broke off after some output. None otherwise."""
    admitted, outcome = call.admitted, call.outcome
    if outcome.usage is not None or (
        outcome.status_code >= 400 and not outcome.completion_parts and not outcome.client_disconnected
    ):
        return None
    return outcome.upstream_model or outcome.routed_model or admitted.model or ""


def _estimate(call: CallRecord, model: str) -> Usage:
    """Count tokens ourselves: the upstream sent no usage, or the client left before it came."""
    admitted, outcome = call.admitted, call.outcome
    body: dict[str, Any] = admitted.request_body or {}
    try:
        asked = endpoints.metered(admitted.endpoint or "").dialect.prompt(body)
        prompt = (
            tokens.count_chat_prompt(model, asked.chat)
            if asked.chat is not None
            else tokens.count_input(model, asked.input)
        )
        completion = tokens.count_text(model, "".join(outcome.completion_parts))
    except Exception:  # counting must never lose the event; a row with zero tokens is still a row
        log.warning("token estimation failed", exc_info=True)
        return Usage()
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def usage_of(call: CallRecord) -> tuple[Usage, UsageSource]:
    """The call's tokens and where they come from."""
    outcome = call.outcome
    if outcome.usage is not None:
        return outcome.usage, UPSTREAM
    model = estimated_with(call)
    if model is not None:
        return _estimate(call, model), "estimated"
    # Rejected before any generation (429, 5xx after retries, timeouts): nothing was billed.
    return Usage(), "estimated"


def event_line(
    call: CallRecord, usage: Usage, source: UsageSource, priced: Priced, tier: str | None, elapsed_s: float
) -> bytes:
    """The call's usage event as the recorder's line (events.py), built straight from the call: the
    fields positionally, in UsageEvent's order. `elapsed_s`: from the call's start to its end."""
    admitted, outcome = call.admitted, call.outcome
    return line(
        (
            outcome.usage_key or call.request_id,
            round((outcome.usage_created_at or call.created_at) * 1_000_000),
            admitted.api_key_id,
            admitted.feature,
            admitted.user_id,
            admitted.endpoint,
            admitted.model,
            outcome.upstream_model or outcome.routed_model,
            admitted.stream,
            outcome.status_code,
            outcome.attempts,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens,
            usage.cached_tokens,
            usage.reasoning_tokens,
            source,
            priced.cost_units,
            round(elapsed_s * 1000),
            None if outcome.ttfb_s is None else round(outcome.ttfb_s * 1000),
            outcome.error_type,
            admitted.prompt_truncated,
            call.client_request_id,
            None if admitted.admission is None else admitted.admission.reserved_units,
            tier,
            priced.price_key,
            priced.price_version,
            usage.audio_prompt_tokens,
            usage.audio_completion_tokens,
            usage.image_prompt_tokens,
            usage.image_completion_tokens,
            None if admitted.browser_token is None else admitted.browser_token.id,
        )
    )
