"""POST /v1/embeddings: relayed untouched; its usage (prompt tokens) metered."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.deps import CallDep, PolicyDep, PrincipalDep, SettingsDep, UpstreamDep
from app.errors import bad_request
from app.relay import Payload, forward
from app.routes.metered import read_metered

router = APIRouter()


def _check_input(body: dict[str, Any]) -> None:
    if "input" not in body:
        raise bad_request(
            "Missing required parameter: 'input'.", param="input", code="missing_required_parameter"
        )


@router.post("/v1/embeddings")
async def embeddings(
    request: Request,
    _: PrincipalDep,
    settings: SettingsDep,
    policy: PolicyDep,
    upstream: UpstreamDep,
    call: CallDep,
) -> Response:
    metered = await read_metered(request, settings, policy, call, "/v1/embeddings")
    if "input" not in metered.body:
        raise bad_request(
            "Missing required parameter: 'input'.", param="input", code="missing_required_parameter"
        )
    return await forward(
        upstream,
        call,
        metered.candidates,
        path="/embeddings",
        payload=Payload(metered.raw, metered.body),
        client_headers=request.headers,
        inspector=None,
    )
