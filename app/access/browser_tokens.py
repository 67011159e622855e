"""Browser tokens: short-lived credentials a backend mints with its gateway key for one end user's page.

A token is `gwb_<claims>.<signature>`: the claims as base64url JSON, signed with HMAC-SHA256 under a server
secret (GATEWAY_BROWSER_TOKEN_SECRET, or one derived from the master key). Verifying one needs no database:
the signature and the expiry are checked here, and the minting key — which the token names by id — comes
from the key cache (app/access/keys.py), so a token dies with its key, revoked or expired, as fast as the key
itself does.

What a token may do is the minting key's power narrowed, never widened: the key's own scopes less every
class that stores objects or starts work (only DEFAULT_SCOPES, the pay-per-call classes, remain; minting
tokens is not among them, nor reading the usage reports), the key's models narrowed to the token's, one
feature and one user fixed whatever the page's headers say, and the key's limits and budgets still
counted with the token's own.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import secrets
import time

import orjson

from app.access.endpoint_classes import DEFAULT_SCOPES
from app.call.who import ApiKey, BrowserToken
from app.config import Settings
from app.errors import GatewayError

TOKEN_PREFIX = "gwb_"
ID_PREFIX = "btk_"
MAX_TTL_S = 3600
DEFAULT_TTL_S = 600
# Far beyond any token minted here (100 models, 20 origins): a longer one is refused before decoding.
MAX_TOKEN_CHARS = 16 * 1024
# The classes a token may reach (those of them its key may): calls paid for as they are made.
TOKEN_CLASSES = frozenset(DEFAULT_SCOPES)
_SIGNED = b"llm-gateway browser token v1."


def new_token_id() -> str:
    return ID_PREFIX + secrets.token_hex(12)


def signing_key(settings: Settings) -> bytes:
    if settings.browser_token_secret is not None:
        return settings.browser_token_secret.get_secret_value().encode()
    # Derived, not the master key itself: a token's signature must reveal nothing usable about it.
    return hmac.digest(settings.master_key.get_secret_value().encode(), b"browser-token-signing", "sha256")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _signature(secret: bytes, claims: str) -> str:
    return _b64(hmac.digest(secret, _SIGNED + claims.encode("ascii"), hashlib.sha256))


def sign(token: BrowserToken, secret: bytes) -> str:
    claims = _b64(orjson.dumps(token.claims()))
    return f"{TOKEN_PREFIX}{claims}.{_signature(secret, claims)}"


def _invalid() -> GatewayError:
    return GatewayError(
        401,
        "Invalid or expired browser token; ask the page's backend for a new one.",
        code="invalid_api_key",
        headers={"www-authenticate": "Bearer"},
    )


def verify(presented: str, secret: bytes, now: float | None = None) -> BrowserToken:
    """The token's claims, if it is signed with `secret` and not expired; a 401 GatewayError otherwise."""
    if len(presented) > MAX_TOKEN_CHARS:
        raise _invalid()
    claims, _, signature = presented[len(TOKEN_PREFIX) :].partition(".")
    if not claims.isascii() or not hmac.compare_digest(
        signature.encode(), _signature(secret, claims).encode()
    ):
        raise _invalid()
    try:
        token = BrowserToken.from_claims(
            orjson.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
        )
    except (binascii.Error, orjson.JSONDecodeError, KeyError, TypeError, ArithmeticError):
        raise _invalid() from None
    if token.expires_at <= (time.time() if now is None else now):
        raise _invalid()
    return token


def check_origin(token: BrowserToken, origin: str | None) -> None:
    """A page's browser sends its origin with every cross-origin call, and no script can change it: a
    token that leaks is of no use to a page elsewhere. (A program outside a browser can send any Origin;
    the short lifetime and the token's limits bound what it can do with a leaked one.)"""
    if origin is None or origin.lower() not in token.origins:
        raise GatewayError(
            403,
            f"This browser token may not be used from origin '{(origin or '(none)')[:200]}'.",
            code="origin_not_allowed",
        )


def token_key(key: ApiKey, token: BrowserToken) -> ApiKey:
    """The minting key as the token may use it, checked against the key as it is now (a key narrowed
    after minting narrows its tokens too)."""
    if key.pin_feature and token.feature != key.default_feature:
        raise _invalid()
    models = token.models
    if key.allowed_models is not None:
        allowed = set(key.allowed_models)
        models = key.allowed_models if models is None else tuple(m for m in models if m in allowed)
    return dataclasses.replace(
        key,
        default_feature=token.feature,
        pin_feature=True,
        allowed_models=models,
        scopes=TOKEN_CLASSES if key.scopes is None else key.scopes & TOKEN_CLASSES,
        # The usage reports show every user's spend: never a page's business.
        reports=False,
    )
