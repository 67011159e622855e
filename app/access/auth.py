"""Bearer key -> principal. The client's key is the gateway's; it never goes upstream."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from fastapi import Request

from app.access.keys import SECRET_PREFIX, ApiKey, KeyLookupUnavailable, KeyStore
from app.call import STATE_KEY, CallRecord
from app.errors import GatewayError


@dataclass(frozen=True, slots=True)
class Principal:
    is_master: bool
    key: ApiKey | None = None

    @property
    def key_id(self) -> str | None:
        return self.key.id if self.key is not None else None


_MASTER = Principal(is_master=True)


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


async def authenticate(presented: str, master_key: str, keys: KeyStore) -> Principal:
    # Constant-time comparison: the master key must not be guessable from response timing. Gateway keys
    # are looked up by their hash, which leaks nothing about the secret.
    if hmac.compare_digest(presented.encode(), master_key.encode()):
        return _MASTER
    try:
        key = await keys.authenticate(presented) if presented.startswith(SECRET_PREFIX) else None
    except KeyLookupUnavailable:
        raise GatewayError(
            503, "The gateway cannot check keys right now; try again shortly.", code="key_store_unavailable"
        ) from None
    if key is None:
        raise _unauthorized("Incorrect API key provided, or the key was revoked or has expired.")
    return Principal(is_master=False, key=key)


async def require_principal(request: Request, headers: Mapping[str, str] | None = None) -> Principal:
    settings = request.app.state.settings
    principal = await authenticate(
        bearer_key((headers if headers is not None else request.headers).get("authorization")),
        settings.master_key.get_secret_value(),
        request.app.state.keys,
    )
    call: CallRecord = request.scope["state"][STATE_KEY]
    call.key = principal.key
    call.api_key_id = principal.key_id
    return principal


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
