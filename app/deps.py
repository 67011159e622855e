"""`Annotated` dependency aliases, so routes declare what they need in their signatures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from app.auth import Principal, require_master, require_principal
from app.call import STATE_KEY, CallRecord
from app.config import Settings
from app.policy import Policy
from app.upstream import UpstreamClient


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(_settings)]


@dataclass(slots=True)
class Gateway:
    """What a /v1 route works with: its authenticated caller and CallRecord, and the process's settings,
    policy (the one in force when the request arrived) and upstream client. One dependency instead of
    five keeps the routes short and FastAPI's per-request resolution cheap."""

    principal: Principal
    call: CallRecord
    # The request's headers as a plain dict (lower-case names): Starlette's Headers scans a list and
    # raises KeyError for every absent header it is asked about (5% of the loop relaying streams).
    headers: dict[str, str]
    settings: Settings
    policy: Policy
    upstream: UpstreamClient


async def gateway(request: Request) -> Gateway:
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in request.scope["headers"]}
    principal = await require_principal(request, headers)
    state = request.app.state
    return Gateway(
        principal, request.scope["state"][STATE_KEY], headers, state.settings, state.policy, state.upstream
    )


GatewayDep = Annotated[Gateway, Depends(gateway)]
MasterDep = Annotated[Principal, Depends(require_master)]
