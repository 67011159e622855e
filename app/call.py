"""What one gateway call learned about itself, kept on the request's state.

Routes and the upstream client fill it in as the call proceeds; the access log and the metering
middleware read it once the response has ended. It is the only channel between them, so the data path
stays one-directional.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.types import Scope

from app.access.keys import ApiKey

if TYPE_CHECKING:
    from app.access.browser_tokens import BrowserToken
    from app.limits.admission import Admission

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
class CallRecord:
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
    # Set by auth and attribution.
    key: ApiKey | None = None
    api_key_id: str | None = None
    feature: str | None = None
    user_id: str | None = None
    # A call made with a browser token: it fixes the feature and the user, and has limits of its own.
    browser_token: BrowserToken | None = None
    # Set by the route: metered routes set `endpoint`; unmetered ones leave it None.
    endpoint: str | None = None
    model: str | None = None
    stream: bool = False
    # Set by the upstream client and the relay: the model sent upstream that answered (after aliases and
    # fallbacks), and the one the upstream says it is (e.g. a dated snapshot).
    routed_model: str | None = None
    upstream_model: str | None = None
    attempts: int = 0
    # When the upstream call must be over (time.perf_counter()): set by its first attempt, shared by
    # the fallbacks after it.
    upstream_deadline: float | None = None
    status_code: int = 0
    usage: Usage | None = None
    # The service tier the answer says served it (`default`, `flex`, `priority`, `scale`), which prices it.
    service_tier: str | None = None
    ttfb_s: float | None = None
    error_type: str | None = None
    client_disconnected: bool = False
    # The usage row's unique key when it is not the request id: a background response is metered under
    # its response id, so however often it is polled it lands once.
    usage_key: str | None = None
    # A resumed stream of a response metered elsewhere: a row only if its final usage arrives.
    metered_only_with_usage: bool = False
    # Set by the limits: what was reserved before the call (settled after it), and whether old messages
    # were dropped to fit the feature's prompt budget.
    admission: Admission | None = None
    prompt_truncated: bool = False
    # What the metering needs to count tokens itself when the upstream reports no usage.
    request_body: dict[str, Any] | None = None
    completion_parts: list[str] = field(default_factory=list)
    # Set by metering once the call is counted: the usage recorded (the upstream's or the gateway's own
    # count) and its cost, for what reports on the call after it (the trace).
    metered_usage: Usage | None = None
    cost_units: int | None = None
    # Set when metering waits for a tokenizer to be built: done once the call is counted.
    pending_metering: asyncio.Task[None] | None = None

    def mark_first_byte(self) -> None:
        if self.ttfb_s is None:
            self.ttfb_s = time.perf_counter() - self.started


def get_call(scope: Scope) -> CallRecord | None:
    state = scope.get("state")
    return state.get(STATE_KEY) if state is not None else None
