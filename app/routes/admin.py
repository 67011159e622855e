"""/admin/*: gateway keys (master key only). The secret is in the creation answer and nowhere else."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Request
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.responses import Response

from app.access.endpoint_classes import DEFAULT_SCOPES, parse_scopes
from app.access.keys import KeyStore, public
from app.call.who import ApiKey
from app.config_file import Caps, GatewayConfig
from app.db.models import usage_daily
from app.errors import GatewayError
from app.limits.budgets import resets_at
from app.limits.guard import Guard
from app.limits.redis_guard import RedisUnavailable
from app.money import usd
from app.routes.deps import MasterDep
from app.services import services_of

router = APIRouter(prefix="/admin")


def _printable(value: str) -> str:
    if not value.isprintable():
        raise ValueError("must be printable characters")
    return value


Label = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_printable)]
ModelName = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_printable)]
Usd = Annotated[Decimal, Field(ge=0, max_digits=20, decimal_places=10)]
Scopes = Annotated[
    list[Annotated[str, Field(max_length=64)]], Field(max_length=100), AfterValidator(parse_scopes)
]


class _KeyFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    owner: Label | None = None
    default_feature: Label | None = None
    # Pinned: the key bills its default feature only; an X-Feature naming another is refused.
    pin_feature: bool = False
    allowed_models: Annotated[list[ModelName], Field(max_length=1000)] | None = None
    # The endpoint classes the key may call; ["*"]: every class, including any added later.
    scopes: Scopes = Field(default_factory=lambda: list(DEFAULT_SCOPES))
    rpm_limit: Annotated[int, Field(ge=1, le=10**9)] | None = None
    tpm_limit: Annotated[int, Field(ge=1, le=10**12)] | None = None
    budget_daily_usd: Usd | None = None
    budget_monthly_usd: Usd | None = None
    expires_at: AwareDatetime | None = None


class KeyCreate(_KeyFields):
    name: Label

    @model_validator(mode="after")
    def _pin_needs_feature(self) -> KeyCreate:
        if self.pin_feature and self.default_feature is None:
            raise ValueError("pin_feature needs a default_feature")
        return self


class KeyUpdate(_KeyFields):
    name: Label | None = None
    pin_feature: bool | None = None  # type: ignore[assignment]
    scopes: Scopes | None = None  # type: ignore[assignment]

    def changes(self) -> dict[str, Any]:
        changes = {name: getattr(self, name) for name in self.model_fields_set}
        for required in ("name", "pin_feature", "scopes"):
            if required in changes and changes[required] is None:
                raise GatewayError(400, f"'{required}' cannot be null.", param=required)
        return changes


def _store(request: Request) -> KeyStore:
    return services_of(request).keys


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _found(key: ApiKey | None, key_id: str) -> ApiKey:
    if key is None:
        raise GatewayError(404, f"No key with id '{key_id}'.", param="id", code="key_not_found")
    return key


@router.post("/keys")
async def create_key(request: Request, spec: KeyCreate, _: MasterDep) -> Response:
    key, secret = await _store(request).create(spec.model_dump())
    return _json({**public(key), "secret": secret}, status=201)


@router.get("/keys")
async def list_keys(request: Request, _: MasterDep) -> Response:
    keys = await _store(request).list()
    return _json({"object": "list", "data": [public(key) for key in keys]})


@router.get("/keys/{key_id}")
async def get_key(request: Request, key_id: str, _: MasterDep) -> Response:
    return _json(public(_found(await _store(request).get(key_id), key_id)))


@router.patch("/keys/{key_id}")
async def update_key(request: Request, key_id: str, spec: KeyUpdate, _: MasterDep) -> Response:
    changes = spec.changes()
    store = _store(request)
    key = await store.update(key_id, changes) if changes else await store.get(key_id)
    return _json(public(_found(key, key_id)))


@router.delete("/keys/{key_id}")
async def revoke_key(request: Request, key_id: str, _: MasterDep) -> Response:
    return _json(public(_found(await _store(request).revoke(key_id), key_id)))


@router.get("/budgets")
async def budgets(request: Request, _: MasterDep) -> Response:
    """Every spend cap in force, with what its scope has spent this period and, apart, what the calls in
    flight hold against it (their worst case, until they end)."""
    state = services_of(request)
    guard: Guard = state.guard
    config: GatewayConfig = state.config.current.policy.config
    caps: list[tuple[str, Caps]] = [
        (
            f"key:{key.id}",
            Caps(budget_daily_usd=key.budget_daily_usd, budget_monthly_usd=key.budget_monthly_usd),
        )
        for key in await _store(request).list()
        if key.revoked_at is None
    ]
    caps += [(f"feature:{name}", rules) for name, rules in config.features.items()]
    if config.users.budget_daily_usd is not None or config.users.budget_monthly_usd is not None:
        caps += [
            (f"user:{user}", config.users) for user in await _users_this_month(state.engine, guard.clock())
        ]
    now = guard.clock()
    data = []
    for scope, rules in caps:
        for period, cap in (("day", rules.budget_daily_usd), ("month", rules.budget_monthly_usd)):
            if cap is None:
                continue
            try:
                spent = await guard.ledger.spent(scope, period, now)
                reserved = await guard.ledger.reserved(scope, period, now)
            except RedisUnavailable:
                # An unknown spend is not a zero one.
                raise GatewayError(
                    503, "Budgets cannot be read right now; try again shortly.", code="budget_unavailable"
                ) from None
            data.append(
                {
                    "scope": scope,
                    "period": period,
                    "cap_usd": usd(cap),
                    "spent_usd": usd(spent),
                    "reserved_usd": usd(reserved),
                    "remaining_usd": usd(max(cap - spent - reserved, Decimal(0))),
                    "resets_at": resets_at(period, now).isoformat().replace("+00:00", "Z"),
                }
            )
    return _json({"object": "list", "data": data})


async def _users_this_month(engine: AsyncEngine, now: datetime) -> list[str]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(usage_daily.c.user_id)
            .where(usage_daily.c.day >= now.date().replace(day=1), usage_daily.c.user_id != "")
            .group_by(usage_daily.c.user_id)
            .order_by(func.sum(usage_daily.c.cost_usd).desc())
            .limit(1000)
        )
        return [row[0] for row in rows]
