"""Browser tokens: minted by a backend's key for one end user, used by a page with the official SDK. They
bill their user and feature whatever the page sends, die with their key, and never exceed it."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import openai
import orjson
import pytest

from app.access.browser_tokens import verify
from app.errors import GatewayError
from tests.conftest import sdk_client
from tests.db import wait_for_rows
from tests.gateway.test_keys import MASTER, create_key
from tests.harness import MASTER_KEY, ThreadedGateway

PAGE = "http://127.0.0.1:5173"
MESSAGES: Any = [{"role": "user", "content": "hi"}]


def browser_key(gateway: ThreadedGateway, **spec: Any) -> dict[str, Any]:
    return create_key(gateway, scopes=["chat", "models", "files", "browser_tokens"], **spec)


def mint(gateway: ThreadedGateway, secret: str, expect: int = 200, **spec: Any) -> dict[str, Any]:
    response = httpx.post(
        gateway.base_url + "/browser_tokens",
        json={"user_id": "user-42", "origins": [PAGE], **spec},
        headers={"authorization": f"Bearer {secret}"},
    )
    assert response.status_code == expect, response.text
    minted: dict[str, Any] = response.json()
    return minted


def page_client(gateway: ThreadedGateway, token: str, origin: str = PAGE) -> openai.OpenAI:
    # As the SDK in the page sends it: the browser adds Origin to every cross-origin call.
    return sdk_client(gateway.base_url, api_key=token, default_headers={"Origin": origin})


def test_a_token_bills_its_user_and_feature_whatever_the_page_sends(
    gateway: ThreadedGateway, database_url: str
) -> None:
    key = browser_key(gateway, default_feature="support-chat")
    minted = mint(gateway, key["secret"], rpm_limit=30, budget_usd="0.5")
    assert minted["token"].startswith("gwb_") and minted["id"].startswith("btk_")
    assert minted["feature"] == "support-chat" and minted["user_id"] == "user-42"
    assert minted["key_id"] == key["id"]
    request_id = f"btk-{uuid.uuid4().hex}"
    with page_client(gateway, minted["token"]) as sdk:
        stream = sdk.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            stream=True,
            user="someone-else",
            extra_headers={"X-Feature": "other-feature", "X-User-Id": "admin", "X-Request-Id": request_id},
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text
    (row,) = wait_for_rows(database_url, request_id)
    assert (row["user_id"], row["feature"]) == ("user-42", "support-chat")
    assert row["api_key_id"] == key["id"]
    assert row["browser_token_id"] == minted["id"]


def test_origin_binding(gateway: ThreadedGateway) -> None:
    key = browser_key(gateway)
    token = mint(gateway, key["secret"])["token"]
    for origin in ("http://127.0.0.1:5174", "https://evil.example"):
        with (
            page_client(gateway, token, origin) as sdk,
            pytest.raises(openai.PermissionDeniedError) as caught,
        ):
            sdk.models.list()
        assert caught.value.code == "origin_not_allowed"
    # Without an Origin header (not a browser): refused too.
    with sdk_client(gateway.base_url, api_key=token) as sdk, pytest.raises(openai.PermissionDeniedError):
        sdk.models.list()
    with page_client(gateway, token) as sdk:
        assert sdk.models.list().data is not None


def test_a_token_dies_with_its_key(gateway: ThreadedGateway) -> None:
    key = browser_key(gateway)
    token = mint(gateway, key["secret"])["token"]
    with page_client(gateway, token) as sdk:
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert httpx.delete(gateway.url + f"/admin/keys/{key['id']}", headers=MASTER).status_code == 200
        with pytest.raises(openai.AuthenticationError) as caught:
            sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert "revoked" in str(caught.value)


def test_forged_tampered_and_expired_tokens_are_refused(gateway: ThreadedGateway) -> None:
    key = browser_key(gateway)
    token = mint(gateway, key["secret"])["token"]
    claims, _, signature = token[4:].partition(".")
    decoded = orjson.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    widened = base64.urlsafe_b64encode(orjson.dumps({**decoded, "user": "admin"})).rstrip(b"=").decode()
    for bad in (f"gwb_{widened}.{signature}", token[:-2] + "AA", "gwb_", "gwb_.", "gwb_" + "A" * 20000):
        with page_client(gateway, bad) as sdk, pytest.raises(openai.AuthenticationError):
            sdk.models.list()
    # Expiry: the same token checked an hour on, with the gateway's own secret.
    secret = gateway.app.services.token_secret
    assert verify(token, secret).user_id == "user-42"
    with pytest.raises(GatewayError) as caught:
        verify(token, secret, now=time.time() + 601)
    assert caught.value.status == 401


def test_a_token_cannot_exceed_its_key(gateway: ThreadedGateway) -> None:
    key = create_key(
        gateway,
        scopes=["chat", "models", "files", "browser_tokens", "reports"],
        allowed_models=["gpt-4o", "gpt-4o-mini"],
    )
    token = mint(gateway, key["secret"], models=["gpt-4o-mini"])["token"]
    with page_client(gateway, token) as sdk:
        with pytest.raises(openai.PermissionDeniedError) as caught:
            sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert caught.value.code == "model_not_allowed"
        sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        # The key may reach files and mint tokens; its tokens may do neither.
        with pytest.raises(openai.PermissionDeniedError) as caught:
            sdk.files.list()
        assert caught.value.code == "scope_not_allowed"
    minted = httpx.post(
        gateway.base_url + "/browser_tokens",
        json={"user_id": "u", "origins": [PAGE]},
        headers={"authorization": f"Bearer {token}", "origin": PAGE},
    )
    assert minted.status_code == 403, minted.text
    as_page = {"authorization": f"Bearer {token}", "origin": PAGE}
    assert httpx.get(gateway.url + "/admin/keys", headers=as_page).status_code == 403
    # The key may read the usage reports (every user's spend); its tokens may not.
    as_key = {"authorization": f"Bearer {key['secret']}"}
    assert httpx.get(gateway.base_url + "/usage", headers=as_key).status_code == 200
    for path in ("/usage", "/usage/summary"):
        refused = httpx.get(gateway.base_url + path, headers=as_page)
        assert refused.status_code == 403, (path, refused.text)


def test_token_rpm_limit(gateway: ThreadedGateway) -> None:
    key = browser_key(gateway)
    token = mint(gateway, key["secret"], rpm_limit=1)["token"]
    with page_client(gateway, token) as sdk:
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError) as caught:
            sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert "browser token" in str(caught.value)
    # Another token of the same key has its own limit.
    with page_client(gateway, mint(gateway, key["secret"], rpm_limit=1)["token"]) as sdk:
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)


def test_who_may_mint_and_what(gateway: ThreadedGateway) -> None:
    plain = create_key(gateway)  # default scopes: no browser_tokens
    assert mint(gateway, plain["secret"], expect=403)["error"]["code"] == "scope_not_allowed"
    assert mint(gateway, MASTER_KEY, expect=403)["error"]["code"] == "gateway_key_required"
    pinned = browser_key(gateway, default_feature="search", pin_feature=True, allowed_models=["gpt-4o"])
    assert mint(gateway, pinned["secret"], expect=403, feature="other")["error"]["code"] == "feature_pinned"
    assert mint(gateway, pinned["secret"], expect=403, models=["o3"])["error"]["code"] == "model_not_allowed"
    assert mint(gateway, pinned["secret"], models=["gpt-4o"])["feature"] == "search"
    for bad in (
        {"ttl_s": 3601},
        {"ttl_s": 0},
        {"origins": []},
        {"origins": ["http://127.0.0.1:5173/page"]},
        {"origins": ["javascript:alert(1)"]},
        {"user_id": ""},
        {"unknown": 1},
    ):
        error = mint(gateway, pinned["secret"], expect=400, **bad)["error"]
        assert error["type"] == "invalid_request_error", bad
    not_json = httpx.post(
        gateway.base_url + "/browser_tokens",
        content=b"{",
        headers={"authorization": f"Bearer {pinned['secret']}"},
    )
    assert not_json.status_code == 400


def test_minting_checks_the_cors_list(start_gateway: Callable[..., ThreadedGateway]) -> None:
    gateway = start_gateway(cors_origins=(PAGE,))
    key = browser_key(gateway)
    assert (
        mint(gateway, key["secret"], expect=400, origins=["https://elsewhere.example"])["error"]["param"]
        == "origins"
    )
    assert mint(gateway, key["secret"])["origins"] == [PAGE]


def test_token_spend_cap(gateway: ThreadedGateway) -> None:
    key = browser_key(gateway)
    with page_client(gateway, mint(gateway, key["secret"], budget_usd="0")["token"]) as sdk:
        with pytest.raises(openai.RateLimitError) as caught:
            sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert caught.value.code == "budget_exceeded"
        assert "browser token" in str(caught.value)
    # The key itself, and its other tokens, are not held back by one token's cap.
    with page_client(gateway, mint(gateway, key["secret"])["token"]) as sdk:
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
