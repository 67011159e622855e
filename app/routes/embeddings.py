"""POST /v1/embeddings: relayed untouched; its usage (prompt tokens) metered."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from starlette.responses import Response

from app.errors import bad_request
from app.proxy.relay import forward
from app.routes.deps import GatewayDep
from app.routes.metered import read_metered
from app.wire.endpoints import EMBEDDINGS


def _check_input(body: dict[str, Any]) -> None:
    if "input" not in body:
        raise bad_request(
            "Missing required parameter: 'input'.", param="input", code="missing_required_parameter"
        )


async def embeddings(request: Request, gw: GatewayDep) -> Response:
    metered = await read_metered(request, gw, EMBEDDINGS, _check_input)
    return await forward(
        gw.upstream,
        gw.call,
        metered.candidates,
        path=EMBEDDINGS.upstream_path,
        payload=EMBEDDINGS.dialect.payload(metered.raw, metered.body, modified=False, stream=False),
        dialect=EMBEDDINGS.dialect,
        client_headers=gw.headers,
        inspector=None,
        receive=request.receive,
        clients=gw.services.client_watch,
    )
