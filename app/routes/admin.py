"""/admin/*: gateway keys (master key only). The secret is in the creation answer and nowhere else."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Request
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, model_validator
from starlette.responses import Response

from app.deps import MasterDep
from app.errors import GatewayError
from app.keys import ApiKey, KeyStore

router = APIRouter(prefix="/admin")


def _printable(value: str) -> str:
    if not value.isprintable():
        raise ValueError("must be printable characters")
    return value


Label = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_printable)]
ModelName = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_printable)]
Usd = Annotated[Decimal, Field(ge=0, max_digits=20, decimal_places=10)]


class _KeyFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    owner: Label | None = None
    default_feature: Label | None = None
    # Pinned: the key bills its default feature only; an X-Feature naming another is refused.
    pin_feature: bool = False
    allowed_models: Annotated[list[ModelName], Field(max_length=1000)] | None = None
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

    def changes(self) -> dict[str, Any]:
        changes = {name: getattr(self, name) for name in self.model_fields_set}
        for required in ("name", "pin_feature"):
            if required in changes and changes[required] is None:
                raise GatewayError(400, f"'{required}' cannot be null.", param=required)
        return changes


def _store(request: Request) -> KeyStore:
    store: KeyStore = request.app.state.keys
    return store


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _found(key: ApiKey | None, key_id: str) -> ApiKey:
    if key is None:
        raise GatewayError(404, f"No key with id '{key_id}'.", param="id", code="key_not_found")
    return key


@router.post("/keys")
async def create_key(request: Request, spec: KeyCreate, _: MasterDep) -> Response:
    key, secret = await _store(request).create(spec.model_dump())
    return _json({**key.public(), "secret": secret}, status=201)


@router.get("/keys")
async def list_keys(request: Request, _: MasterDep) -> Response:
    keys = await _store(request).list()
    return _json({"object": "list", "data": [key.public() for key in keys]})


@router.get("/keys/{key_id}")
async def get_key(request: Request, key_id: str, _: MasterDep) -> Response:
    return _json(_found(await _store(request).get(key_id), key_id).public())


@router.patch("/keys/{key_id}")
async def update_key(request: Request, key_id: str, spec: KeyUpdate, _: MasterDep) -> Response:
    changes = spec.changes()
    store = _store(request)
    key = await store.update(key_id, changes) if changes else await store.get(key_id)
    return _json(_found(key, key_id).public())


@router.delete("/keys/{key_id}")
async def revoke_key(request: Request, key_id: str, _: MasterDep) -> Response:
    return _json(_found(await _store(request).revoke(key_id), key_id).public())
