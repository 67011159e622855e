"""Who pays for a call: the product feature and the end user, from headers (and the body's `user`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.call.record import CallRecord
from app.errors import GatewayError, bad_request

_MAX_LEN = 128


def _checked(value: str, param: str) -> str:
    if not 1 <= len(value) <= _MAX_LEN or not value.isprintable():
        raise bad_request(f"{param} must be 1-{_MAX_LEN} printable characters", param=param)
    return value


def _header(value: str, param: str) -> str:
    """A header's value is bytes, taken as Latin-1 by the request's header dict: these two are read as
    UTF-8 instead, what clients send (café must not become cafÃ©). ASCII, nearly every value, is the same
    in both and is not decoded again."""
    if not value.isascii():
        try:
            value = value.encode("latin-1").decode("utf-8")
        except UnicodeDecodeError:
            raise bad_request(f"{param} must be UTF-8", param=param) from None
    return _checked(value, param)


def attribute(call: CallRecord, headers: Mapping[str, str], body: Mapping[str, Any] | None) -> None:
    who = call.admitted
    token = who.browser_token
    if token is not None:
        # Fixed by the backend that minted the token: nothing the page sends can bill another.
        who.feature, who.user_id = token.feature, token.user_id
        return
    feature = headers.get("x-feature")
    key = who.key
    if feature is not None:
        who.feature = _header(feature, "X-Feature")
        if key is not None and key.pin_feature and key.default_feature != who.feature:
            raise GatewayError(
                403,
                f"This key is pinned to feature '{key.default_feature}'; it cannot bill '{who.feature}'.",
                param="X-Feature",
                code="feature_pinned",
            )
    elif key is not None:
        who.feature = key.default_feature
    user = headers.get("x-user-id")
    if user is not None:
        who.user_id = _header(user, "X-User-Id")
        return
    if body is None:
        return
    # OpenAI's own end-user fields: `user`, and its successor `safety_identifier`.
    for field in ("user", "safety_identifier"):
        value = body.get(field)
        if isinstance(value, str):
            who.user_id = _checked(value, field)
            return
