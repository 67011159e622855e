"""GET /v1/models: the upstream's list, filtered to what the caller may use, plus configured aliases and
models served by other upstreams."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from app.call.record import CallRecord
from app.edge.canonical_path import upstream_path
from app.errors import GatewayError
from app.limits.policy import Policy
from app.proxy.relay import answer_headers, send_checked
from app.routes.deps import GatewayDep

router = APIRouter()


def _entry(model: str, owner: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 0, "owned_by": owner}


def _listing(policy: Policy, upstream_models: list[dict[str, Any]], call: CallRecord) -> list[dict[str, Any]]:
    allowed = policy.allowed_models(call.admitted.feature, call.admitted.key)
    models = {m["id"]: m for m in upstream_models if isinstance(m, dict) and isinstance(m.get("id"), str)}
    for name, route in policy.config.models.items():
        models.setdefault(name, _entry(name, route.upstreams[0].upstream))
    for alias, target in policy.aliases.items():
        models[alias] = _entry(alias, f"alias of {target}")
    return [m for m in models.values() if allowed is None or policy.resolve(m["id"]) in allowed]


@router.get("/v1/models")
async def list_models(request: Request, gw: GatewayDep) -> Response:
    policy, upstream, call = gw.policy, gw.upstream, gw.call
    answer = await send_checked(
        upstream, call, policy.default_target, "GET", "/models", client_headers=gw.headers
    )
    try:
        data = orjson.loads(answer.body).get("data", [])
    except (orjson.JSONDecodeError, AttributeError):
        raise GatewayError(
            502, "The upstream's model list is not valid JSON.", code="upstream_bad_response"
        ) from None
    body = {"object": "list", "data": _listing(policy, data if isinstance(data, list) else [], call)}
    return Response(
        orjson.dumps(body), media_type="application/json", headers=answer_headers(upstream, answer, call)
    )


@router.get("/v1/models/{model:path}")
async def retrieve_model(request: Request, model: str, gw: GatewayDep) -> Response:
    policy, upstream, call = gw.policy, gw.upstream, gw.call
    allowed = policy.allowed_models(call.admitted.feature, call.admitted.key)
    if allowed is not None and policy.resolve(model) not in allowed:
        raise GatewayError(
            404,
            f"The model '{model}' does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )
    if model in policy.aliases:
        return Response(
            orjson.dumps(_entry(model, f"alias of {policy.aliases[model]}")), media_type="application/json"
        )
    answer = await send_checked(
        upstream,
        call,
        policy.target_for(model),
        "GET",
        upstream_path("models", *model.split("/")),
        client_headers=gw.headers,
    )
    return Response(
        answer.body, media_type="application/json", headers=answer_headers(upstream, answer, call)
    )
