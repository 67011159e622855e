"""Bearer key -> principal. The client's key is the gateway's; it never goes upstream."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from fastapi import Request

from app.access.browser_tokens import TOKEN_PREFIX, check_origin, token_key, verify
from app.access.keys import SECRET_PREFIX, KeyLookupUnavailable, KeyStore
from app.call.record import STATE_KEY, CallRecord
from app.call.who import ApiKey, BrowserToken
from app.errors import GatewayError


@dataclass(frozen=True, slots=True)
class Principal:
    is_master: bool
    # For a browser token: its minting key as the token may use it (app/access/browser_tokens.py).
    key: ApiKey | None = None
    token: BrowserToken | None = None

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
        raise _key_unavailable() from None
    if key is None:
        raise _unauthorized("Incorrect API key provided, or the key was revoked or has expired.")
    return Principal(is_master=False, key=key)


def _key_unavailable() -> GatewayError:
    return GatewayError(
        503, "The gateway cannot check keys right now; try again shortly.", code="key_store_unavailable"
    )


async def authenticate_token(presented: str, origin: str | None, secret: bytes, keys: KeyStore) -> Principal:
    token = verify(presented, secret)
    check_origin(token, origin)
    try:
        key = await keys.usable_by_id(token.key_id)
    except KeyLookupUnavailable:
        raise _key_unavailable() from None
    if key is None:
        raise _unauthorized("The key that made this browser token was revoked or has expired.")
    return Principal(is_master=False, key=token_key(key, token), token=token)


async def identify(
    request: Request, headers: Mapping[str, str], keys: KeyStore, token_secret: bytes, master_key: str
) -> Principal:
    """The caller of `request`, recorded on its CallRecord; `headers` are the request's."""
    presented = bearer_key(headers.get("authorization"))
    if presented.startswith(TOKEN_PREFIX):
        principal = await authenticate_token(presented, headers.get("origin"), token_secret, keys)
    else:
        principal = await authenticate(presented, master_key, keys)
    call: CallRecord = request.scope["state"][STATE_KEY]
    who = call.admitted
    who.key, who.api_key_id, who.browser_token = principal.key, principal.key_id, principal.token
    return principal
