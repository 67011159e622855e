"""`Annotated` dependency aliases, so routes declare what they need in their signatures."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.auth import Principal, require_principal
from app.call import STATE_KEY, CallRecord
from app.config import Settings
from app.upstream import UpstreamClient


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _upstream(request: Request) -> UpstreamClient:
    upstream: UpstreamClient = request.app.state.upstream
    return upstream


def _call(request: Request) -> CallRecord:
    call: CallRecord = request.scope["state"][STATE_KEY]
    return call


SettingsDep = Annotated[Settings, Depends(_settings)]
UpstreamDep = Annotated[UpstreamClient, Depends(_upstream)]
CallDep = Annotated[CallRecord, Depends(_call)]
PrincipalDep = Annotated[Principal, Depends(require_principal)]
