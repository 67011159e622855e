"""`Annotated` dependency aliases, so routes declare what they need in their signatures."""

from __future__ import annotations

from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from app.access.attribution import attribute
from app.access.auth import Principal, identify
from app.access.endpoint_classes import endpoint_class, spends
from app.call.record import STATE_KEY, CallRecord
from app.config import Settings
from app.errors import GatewayError
from app.limits.policy import Policy
from app.live_config import SCOPE_KEY
from app.metering.pricing import PriceTable
from app.ownership import Caller, caller
from app.proxy.upstream import UpstreamClient
from app.services import Services, services_of


def _settings(request: Request) -> Settings:
    return services_of(request).settings


SettingsDep = Annotated[Settings, Depends(_settings)]


@dataclass(slots=True)
class Gateway:
    """What a /v1 route works with: its authenticated caller and CallRecord, the process's services, and
    of those the ones every route reads: the settings, the policy and prices (the ones in force when the
    request arrived) and the upstream client. One dependency instead of five keeps the routes short and
    FastAPI's per-request resolution cheap."""

    principal: Principal
    call: CallRecord
    # The request's headers as a plain dict (lower-case names): Starlette's Headers scans a list and
    # raises KeyError for every absent header it is asked about (5% of the loop relaying streams).
    headers: dict[str, str]
    services: Services
    settings: Settings
    policy: Policy
    prices: PriceTable
    upstream: UpstreamClient

    def caller(self) -> Caller | None:
        """The key making this call as the ownership checks see it: None for the master key."""
        return caller(self.principal.key, self.services.owners, self.call)


async def gateway(request: Request) -> Gateway:
    """For the metered routes, which attribute the call from its body and admit it once they know its
    model and size."""
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in request.scope["headers"]}
    services = services_of(request)
    principal = await _identify(request, headers, services)
    key = principal.key
    if key is not None and key.scopes is not None:
        _require_scope(key.scopes, request.scope["path"])
    # Taken once and kept, in the request's state for the metering at its end too (app.live_config).
    state, config = request.scope["state"], services.config.current
    state[SCOPE_KEY] = config
    return Gateway(
        principal,
        state[STATE_KEY],
        headers,
        services,
        services.settings,
        config.policy,
        config.prices,
        services.upstream,
    )


async def require_principal(request: Request) -> Principal:
    return await _identify(request, request.headers, services_of(request))


def _identify(
    request: Request, headers: Mapping[str, str], services: Services
) -> Coroutine[None, None, Principal]:
    # The coroutine itself, not one awaiting it: a frame less on every call.
    return identify(
        request,
        headers,
        services.keys,
        services.token_secret,
        services.settings.master_key.get_secret_value(),
    )


async def require_master(request: Request) -> Principal:
    principal = await require_principal(request)
    if not principal.is_master:
        raise GatewayError(403, "This endpoint needs the gateway's master key.", code="master_key_required")
    return principal


async def require_reports(request: Request) -> Principal:
    """The usage reports show every feature's and user's spend: the master key, or a key given the
    `reports` scope by name."""
    principal = await require_principal(request)
    if not principal.is_master and not (principal.key is not None and principal.key.reports):
        raise GatewayError(
            403,
            "Reading usage reports needs the master key or a key with the 'reports' scope; the gateway's "
            "admin can grant it.",
            code="scope_not_allowed",
        )
    return principal


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
    guard = gw.services.guard
    if guard.concerns(call):
        call.admitted.admission = await guard.admit_unpriced(
            call, gw.policy.config, spends=spends(request.method, request.scope["path"])
        )
    return gw


GatewayDep = Annotated[Gateway, Depends(admitted_gateway)]
MasterDep = Annotated[Principal, Depends(require_master)]
ReportsDep = Annotated[Principal, Depends(require_reports)]
