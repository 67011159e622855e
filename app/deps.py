"""`Annotated` dependency aliases, so routes declare what they need in their signatures."""

from __future__ import annotations

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


def _upstream(request: Request) -> UpstreamClient:
    upstream: UpstreamClient = request.app.state.upstream
    return upstream


def _policy(request: Request) -> Policy:
    # Read per request: SIGHUP swaps the whole object, and a request keeps the one it started with.
    policy: Policy = request.app.state.policy
    return policy


def _call(request: Request) -> CallRecord:
    call: CallRecord = request.scope["state"][STATE_KEY]
    return call


SettingsDep = Annotated[Settings, Depends(_settings)]
UpstreamDep = Annotated[UpstreamClient, Depends(_upstream)]
PolicyDep = Annotated[Policy, Depends(_policy)]
CallDep = Annotated[CallRecord, Depends(_call)]
PrincipalDep = Annotated[Principal, Depends(require_principal)]
MasterDep = Annotated[Principal, Depends(require_master)]
