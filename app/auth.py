"""Bearer key -> principal. The client's key is the gateway's; it never goes upstream."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Request

from app.errors import GatewayError


@dataclass(frozen=True, slots=True)
class Principal:
    is_master: bool
    key_id: str | None = None


def _unauthorized(message: str) -> GatewayError:
    return GatewayError(401, message, code="invalid_api_key", headers={"www-authenticate": "Bearer"})


def bearer_key(authorization: str | None) -> str:
    if not authorization:
        raise _unauthorized(
            "You didn't provide an API key. Send your gateway key as 'Authorization: Bearer <key>'."
        )
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise _unauthorized("Malformed Authorization header; expected 'Bearer <key>'.")
    return key.strip()


def authenticate(presented: str, master_key: str) -> Principal:
    # Constant-time comparison: the key must not be guessable from response timing.
    if hmac.compare_digest(presented.encode(), master_key.encode()):
        return Principal(is_master=True)
    raise _unauthorized("Incorrect API key provided.")


async def require_principal(request: Request) -> Principal:
    settings = request.app.state.settings
    principal = authenticate(
        bearer_key(request.headers.get("authorization")), settings.master_key.get_secret_value()
    )
    call = request.state.gateway_call
    call.api_key_id = principal.key_id
    return principal
