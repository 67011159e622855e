"""POST /v1/browser_tokens: a backend holding a gateway key mints a short-lived token for one end user's page.

The key needs the `browser_tokens` scope (granted explicitly, never by default). A token cannot reach this
route itself, so it cannot mint others; the master key cannot mint either, since a token must die with
the key that made it.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated

import orjson
from fastapi import APIRouter, Request
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

from app.access.browser_tokens import DEFAULT_TTL_S, MAX_TTL_S, new_token_id, sign
from app.call.who import BrowserToken
from app.config import is_origin
from app.errors import GatewayError, bad_request
from app.proxy.body import parse_object, read_body
from app.routes.deps import GatewayDep

router = APIRouter()

# A token request is a few hundred bytes; this bounds what is read before it is refused.
_MAX_BODY_BYTES = 64 * 1024


def _printable(value: str) -> str:
    if not value.isprintable():
        raise ValueError("must be printable characters")
    return value


def _origin(value: str) -> str:
    value = value.lower()
    if not is_origin(value):
        raise ValueError("must be an origin: scheme://host[:port], nothing after it")
    return value


Label = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_printable)]
ModelName = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_printable)]
Origin = Annotated[str, Field(max_length=300), AfterValidator(_origin)]


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Label
    # Default: the key's default feature. A key pinned to its feature can mint for that one only.
    feature: Label | None = None
    # Default: the models the key may use. Each must be one of them.
    models: Annotated[list[ModelName], Field(min_length=1, max_length=100)] | None = None
    origins: Annotated[list[Origin], Field(min_length=1, max_length=20)]
    ttl_s: int = Field(default=DEFAULT_TTL_S, ge=10, le=MAX_TTL_S)
    rpm_limit: int | None = Field(default=None, ge=1, le=10**6)
    budget_usd: Decimal | None = Field(default=None, ge=0, max_digits=20, decimal_places=10)


def _parsed(raw: bytes) -> TokenRequest:
    try:
        return TokenRequest.model_validate(parse_object(raw))
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise bad_request(f"Invalid '{param}': {first['msg']}.", param=param) from None


@router.post("/v1/browser_tokens")
async def mint(request: Request, gw: GatewayDep) -> Response:
    principal = gw.principal
    key = principal.key
    if principal.token is not None or key is None:
        raise GatewayError(
            403,
            "Browser tokens are minted with a gateway key (not the master key, not another token): a token "
            "lives and dies with the key that made it.",
            code="gateway_key_required",
        )
    spec = _parsed(await read_body(request, _MAX_BODY_BYTES, gw.headers.get("content-length")))
    feature = spec.feature or key.default_feature
    if key.pin_feature and feature != key.default_feature:
        raise GatewayError(
            403,
            f"This key is pinned to feature '{key.default_feature}'; it cannot mint tokens for '{feature}'.",
            param="feature",
            code="feature_pinned",
        )
    models = tuple(spec.models) if spec.models is not None else key.allowed_models
    if spec.models is not None and key.allowed_models is not None:
        policy = gw.policy
        allowed = {policy.resolve(model) for model in key.allowed_models}
        refused = [model for model in spec.models if policy.resolve(model) not in allowed]
        if refused:
            raise GatewayError(
                403, f"This key may not use model '{refused[0]}'.", param="models", code="model_not_allowed"
            )
    cors = gw.settings.cors_origins
    if cors and cors != ("*",):
        outside = [origin for origin in spec.origins if origin not in cors]
        if outside:
            raise bad_request(
                f"Origin '{outside[0]}' is not in GATEWAY_CORS_ORIGINS: a page there could not call the "
                "gateway.",
                param="origins",
            )
    token = BrowserToken(
        id=new_token_id(),
        key_id=key.id,
        user_id=spec.user_id,
        feature=feature,
        models=models,
        origins=tuple(dict.fromkeys(spec.origins)),
        expires_at=int(time.time()) + spec.ttl_s,
        rpm_limit=spec.rpm_limit,
        budget_usd=spec.budget_usd,
    )
    body = {
        "object": "browser_token",
        "id": token.id,
        "token": sign(token, gw.services.token_secret),
        "expires_at": datetime.fromtimestamp(token.expires_at, UTC).isoformat().replace("+00:00", "Z"),
        "key_id": key.id,
        "user_id": token.user_id,
        "feature": token.feature,
        "models": list(models) if models is not None else None,
        "origins": list(token.origins),
        "rpm_limit": token.rpm_limit,
        "budget_usd": None if token.budget_usd is None else format(token.budget_usd.normalize(), "f"),
    }
    return Response(orjson.dumps(body), media_type="application/json")
