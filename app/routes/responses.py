"""The Responses API: POST /v1/responses (JSON and SSE), and the retrieval, resumed streaming and
cancelling of background responses, which are metered once, when they are found complete."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from app.call.admission import charge_to
from app.edge.canonical_path import upstream_path
from app.limits.guard import Guard
from app.ownership import admit, body_check
from app.ownership.created import record_created, stored_response
from app.proxy.background import BackgroundResponses
from app.proxy.relay import answer_headers, send_checked
from app.proxy.streaming import EventRelayResponse
from app.proxy.upstream import is_sse, never_open
from app.routes.deps import Gateway, GatewayDep
from app.routes.metered import forward_metered, read_metered
from app.services import services_of
from app.wire.endpoints import RESPONSES
from app.wire.openai import learn_response

router = APIRouter()

ENDPOINT = RESPONSES.path
# A response in one of these states will not change again; its usage is final.
_FINAL = frozenset({"completed", "failed", "incomplete", "cancelled"})


def _registry(request: Request) -> BackgroundResponses:
    registry: BackgroundResponses = services_of(request).background
    return registry


def _parsed(body: bytes) -> dict[str, Any] | None:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


async def create_response(request: Request, gw: GatewayDep) -> Response:
    call, who = gw.call, gw.caller()
    metered = await read_metered(request, gw, RESPONSES, owned=body_check(who, "responses"))
    response = await forward_metered(
        request,
        gw,
        RESPONSES,
        metered,
        lambda answer: record_created(who, "response", stored_response(metered.body), answer),
    )
    if metered.body.get("background") is True and not call.admitted.stream and response.status_code < 300:
        created = _parsed(bytes(response.body))
        if created is not None and isinstance(created.get("id"), str) and created.get("status") not in _FINAL:
            # Queued: nothing to meter yet. The poll that finds it complete meters it, for this caller.
            target = next(c.target for c in metered.candidates if c.model == call.outcome.routed_model)
            _registry(request).remember(created["id"], call, target.name)
            call.admitted.endpoint = None
    return response


async def _follow(request: Request, response_id: str, method: str, suffix: str, gw: Gateway) -> Response:
    policy, upstream, call = gw.policy, gw.upstream, gw.call
    admitted, outcome = call.admitted, call.outcome
    guard: Guard = gw.services.guard
    await admit(gw.caller(), method, f"responses/{response_id}{suffix}", "")
    registry = _registry(request)
    origin = registry.origin(response_id)
    target = policy.targets.get(origin.upstream, policy.default_target) if origin else policy.default_target
    stream = request.query_params.get("stream") == "true"
    query = f"?{request.url.query}" if request.url.query else ""
    answer = await send_checked(
        upstream,
        call,
        target,
        method,
        upstream_path("responses", response_id) + suffix + query,
        client_headers=gw.headers,
        keep_open=is_sse if stream else never_open,
        dialect=RESPONSES.dialect,
    )
    if origin is not None:
        # Metered as its creator's call: this poll's admission, for the poller's scopes, must not be
        # charged with the creator's cost.
        if admitted.admission is not None:
            guard.release(admitted.admission)
        admitted.admission = None
        admitted.feature, admitted.user_id, admitted.api_key_id, admitted.model = (
            origin.feature,
            origin.user_id,
            origin.api_key_id,
            origin.model,
        )
    headers = answer_headers(upstream, answer, call)
    if answer.stream is not None:
        # A resumed background stream: metered only if it reaches the end, under the response id.
        admitted.endpoint, admitted.stream, admitted.metered_only_with_usage = ENDPOINT, True, True
        return EventRelayResponse(
            answer,
            call,
            RESPONSES.dialect.inspector(call.outcome, None),
            headers,
            upstream.max_event_bytes,
            keepalives=gw.services.keepalives,
        )
    found = _parsed(answer.body)
    if (
        found is not None
        and found.get("background") is True
        and found.get("status") in _FINAL
        and isinstance(found.get("usage"), dict)
        and registry.first_metering(response_id)
    ):
        if origin is not None:
            # Charged once to the budgets of the call that created it (a resumed stream's end is not).
            admitted.admission = charge_to(origin.api_key_id, origin.feature, origin.user_id)
        learn_response(outcome, found)
        admitted.endpoint = ENDPOINT
        admitted.model = admitted.model or outcome.upstream_model
    return Response(answer.body, status_code=answer.status, headers=headers, media_type="application/json")


@router.get("/v1/responses/{response_id}")
async def retrieve_response(request: Request, response_id: str, gw: GatewayDep) -> Response:
    return await _follow(request, response_id, "GET", "", gw)


@router.post("/v1/responses/{response_id}/cancel")
async def cancel_response(request: Request, response_id: str, gw: GatewayDep) -> Response:
    return await _follow(request, response_id, "POST", "/cancel", gw)
