"""What one gateway call learned about itself, kept on the request's state.

The record is in three parts, each written by the layer that owns it, in the order the data path meets
them, and only read after it:

- `CallRecord` itself: the request's facts (its ids, method, path and times), written by the request
  context when the request arrives (`app/edge/request_context.py`).
- `Admitted`: what is known once the call is admitted, who (the access layer), what (the route that reads
  the request) and within which limits (the limits' admission).
- `Outcome`: what the call came to (attempts, status, usage, errors), written by the proxy as the call is
  made, and the usage and cost metering counted for it.

The access log, metering and tracing read the record once the response has ended. It is the only channel
between the layers, so the data path stays one-directional.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Scope

from app.call.admission import Admission
from app.call.who import ApiKey, BrowserToken

STATE_KEY = "gateway_call"


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # Subsets of prompt_tokens / completion_tokens, never added on top (priced at their own rate).
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    # Subsets too: audio and image tokens, where the usage object reports them apart from text.
    audio_prompt_tokens: int = 0
    audio_completion_tokens: int = 0
    image_prompt_tokens: int = 0
    image_completion_tokens: int = 0


@dataclass(slots=True)
class Admitted:
    """Who calls, what it asks for and within which limits: fixed when the call is admitted, before it
    goes upstream, and only read after.

    Who: `app/access` (`auth` the key or browser token, `attribution` the feature and the end user). What:
    the route that reads the request (`app/routes/metered.py` for the metered endpoints). The limits: the
    admission steps (`app/routes/metered.py`, `app/routes/deps.admitted_gateway`, and passthrough's hold
    once it has read the body). Two routes learn part of it from the answer: `passthrough` the model and
    endpoint of a call whose answer reports usage, and `responses` the caller of a background response,
    which is metered as the call that created it.
    """

    # Who.
    key: ApiKey | None = None
    api_key_id: str | None = None
    # A call made with a browser token: it fixes the feature and the user, and has limits of its own.
    browser_token: BrowserToken | None = None
    feature: str | None = None
    user_id: str | None = None
    # What: metered routes set `endpoint`; unmetered ones leave it None.
    endpoint: str | None = None
    model: str | None = None
    stream: bool = False
    # What the metering needs to count tokens itself when the upstream reports no usage.
    request_body: dict[str, Any] | None = None
    # A resumed stream of a response metered elsewhere: a row only if its final usage arrives.
    metered_only_with_usage: bool = False
    # The limits: what was reserved before the call (settled after it), and whether old messages were
    # dropped to fit the feature's prompt budget.
    admission: Admission | None = None
    prompt_truncated: bool = False


@dataclass(slots=True)
class Outcome:
    """What the call came to: written by `app/proxy` (the upstream client, the relays, the client watch)
    and, for what the answer says (model, usage, tier, text), by the dialect reading it (`app/wire`), as
    the call is made, except the status, which the request context takes from the response it sends,
    and the metering's fields at the end, written once the call is counted."""

    # The model sent upstream that answered (after aliases and fallbacks), and the one the upstream says
    # it is (e.g. a dated snapshot).
    routed_model: str | None = None
    upstream_model: str | None = None
    attempts: int = 0
    # When the upstream call must be over (time.perf_counter()): set by its first attempt, shared by the
    # fallbacks after it.
    upstream_deadline: float | None = None
    # The response's status; a stream whose 200 went before its call failed keeps the failure's.
    status_code: int = 0
    usage: Usage | None = None
    # The service tier the answer says served it (`default`, `flex`, `priority`, `scale`), which prices it.
    service_tier: str | None = None
    ttfb_s: float | None = None
    error_type: str | None = None
    client_disconnected: bool = False
    # The answer's text, for counting its tokens when the upstream reports no usage.
    completion_parts: list[str] = field(default_factory=list)
    # The usage row's unique key and time when they are not the call's own: a background response is
    # metered under its response id and creation time, so however often it is polled it lands once.
    usage_key: str | None = None
    usage_created_at: float | None = None
    # Written by metering once the call is counted: the usage recorded (the upstream's or the gateway's
    # own count) and its cost, for what reports on the call after it (the trace).
    metered_usage: Usage | None = None
    cost_units: int | None = None
    # Set when metering waits for a tokenizer to be built: done once the call is counted.
    pending_metering: asyncio.Task[None] | None = None


@dataclass(slots=True)
class CallRecord:
    """The request's facts, written by the request context when it arrives (`route` by the hot-route
    dispatcher, which knows it before routing), and the call's two other parts."""

    # The gateway's own id (the usage row's unique key); the client's X-Request-Id, if it sent one, is
    # client_request_id, echoed in the response and logged.
    request_id: str
    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    created_at: float = field(default_factory=time.time)
    client_request_id: str | None = None
    # The route the metrics label it with, when known before routing (app/proxy/hot_routes.py).
    route: str | None = None
    admitted: Admitted = field(default_factory=Admitted)
    outcome: Outcome = field(default_factory=Outcome)

    def mark_first_byte(self) -> None:
        outcome = self.outcome
        if outcome.ttfb_s is None:
            outcome.ttfb_s = time.perf_counter() - self.started


def get_call(scope: Scope) -> CallRecord | None:
    state = scope.get("state")
    return state.get(STATE_KEY) if state is not None else None
