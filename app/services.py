"""The process's services, made once in the lifespan and found by every handler through `services_of`."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import HTTPConnection

from app.access.keys import KeyStore
from app.batches.meter import BatchMeter
from app.config import Settings
from app.db.migrate import SchemaCheck
from app.limits.guard import Guard
from app.live_config import ConfigHolder
from app.metering.metrics import Metrics
from app.metering.middleware import Meter
from app.ownership.store import OwnerStore
from app.proxy.background import BackgroundResponses
from app.proxy.client_watch import ClientWatch
from app.proxy.streaming import KeepAlives
from app.proxy.upstream import UpstreamClient


@dataclass(slots=True, eq=False)
class Services:
    """Everything a handler may need beyond its request, typed, in one place. The policy and prices are
    not fields of their own: they change on SIGHUP, so they are reached through `config`, the one holder
    that the Meter, the BatchMeter and the handlers share (app.live_config)."""

    settings: Settings
    config: ConfigHolder
    metrics: Metrics
    # Signs and verifies browser tokens.
    token_secret: bytes
    upstream: UpstreamClient
    engine: AsyncEngine
    keys: KeyStore
    owners: OwnerStore
    # None when the installation cannot tell which schema it needs (no migrations/): not checked.
    schema: SchemaCheck | None
    guard: Guard
    meter: Meter
    # None unless the Batch API's usage is metered.
    batch_meter: BatchMeter | None
    keepalives: KeepAlives
    client_watch: ClientWatch
    background: BackgroundResponses
    # Usage summaries being computed now: /v1/usage/summary refuses more than a few at once.
    summaries_in_flight: int = 0


def services_of(connection: HTTPConnection) -> Services:
    """The one lookup: the application holds the Services its lifespan made (`GatewayApp.services`)."""
    services: Services = connection.scope["app"].services
    return services
