"""POST /v1/embeddings: relayed untouched; its usage (prompt tokens) metered."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from starlette.responses import Response

from app.access.deps import GatewayDep
from app.errors import bad_request
from app.proxy.relay import Payload, forward
from app.routes.metered import read_metered


def _check_input(body: dict[str, Any]) -> None:
    if "input" not in body:
        raise bad_request(
            "Missing required parameter: 'input'.", param="input", code="missing_required_parameter"
        )


async def embeddings(request: Request, gw: GatewayDep) -> Response:
    metered = await read_metered(request, gw, "/v1/embeddings", _check_input)
    return await forward(
        gw.upstream,
        gw.call,
        metered.candidates,
        path="/embeddings",
        payload=Payload(metered.raw, metered.body),
        client_headers=gw.headers,
        inspector=None,
        receive=request.receive,
        clients=gw.services.client_watch,
    )
