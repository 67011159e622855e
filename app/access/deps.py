"""`Annotated` dependency aliases, so routes declare what they need in their signatures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from app.access.attribution import attribute
from app.access.auth import Principal, require_master, require_principal, require_reports
from app.access.endpoint_classes import endpoint_class, spends
from app.call import STATE_KEY, CallRecord
from app.config import Settings
from app.errors import GatewayError
from app.limits.guard import Guard
from app.limits.policy import Policy
from app.proxy.upstream import UpstreamClient


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
    """For the metered routes, which attribute the call from its body and admit it once they know its
    model and size."""
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in request.scope["headers"]}
    principal = await require_principal(request, headers)
    key = principal.key
    if key is not None and key.scopes is not None:
        _require_scope(key.scopes, request.scope["path"])
    state = request.app.state
    return Gateway(
        principal, request.scope["state"][STATE_KEY], headers, state.settings, state.policy, state.upstream
    )


def _require_scope(scopes: frozenset[str], path: str) -> None:
    name = endpoint_class(path)
    if name not in scopes:
        raise GatewayError(
            403,
            f"This key may not call the '{name}' endpoints; the gateway's admin can grant it the "
            f"'{name}' scope.",
            code="scope_not_allowed",
        )


async def admitted_gateway(request: Request) -> Gateway:
    """For every other /v1 route (passthrough, model lists, retrievals): attributed from its headers and
    admitted before it goes upstream, so no path is a way around the rate limits and budgets."""
    gw = await gateway(request)
    call = gw.call
    attribute(call, gw.headers, None)
    guard: Guard = request.app.state.guard
    if guard.concerns(call):
        call.admitted.admission = await guard.admit_unpriced(
            call, gw.policy.config, spends=spends(request.method, request.scope["path"])
        )
    return gw


GatewayDep = Annotated[Gateway, Depends(admitted_gateway)]
MasterDep = Annotated[Principal, Depends(require_master)]
ReportsDep = Annotated[Principal, Depends(require_reports)]
