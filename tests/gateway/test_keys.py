"""Gateway keys through the admin API: shown once, stored hashed, attributed, revoked at once everywhere."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import sdk_client
from tests.db import database_down, database_up, fetch, wait_for_rows
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, ThreadedGateway, wait_until

MASTER = {"authorization": f"Bearer {MASTER_KEY}"}
MESSAGES = [{"role": "user", "content": "hi"}]


def create_key(gateway: ThreadedGateway, **spec: Any) -> dict[str, Any]:
    response = httpx.post(
        gateway.url + "/admin/keys", json={"name": f"svc-{uuid.uuid4().hex[:6]}", **spec}, headers=MASTER
    )
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def test_secret_is_shown_once_and_stored_as_a_hash(gateway: ThreadedGateway, database_url: str) -> None:
    created = create_key(gateway, owner="search-team")
    secret = created["secret"]
    assert secret.startswith("sk-gw-") and len(secret) > 40
    assert secret.startswith(created["prefix"]) and len(created["prefix"]) < 16
    shown = httpx.get(gateway.url + f"/admin/keys/{created['id']}", headers=MASTER).json()
    assert "secret" not in shown and "secret_hash" not in shown
    listed = httpx.get(gateway.url + "/admin/keys", headers=MASTER).text
    assert secret not in listed
    (row,) = fetch(database_url, "SELECT * FROM api_keys WHERE id = $1", created["id"])
    assert row["secret_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in str(row)


def test_key_calls_are_attributed_to_it(
    gateway: ThreadedGateway, fake: FakeOpenAI, database_url: str
) -> None:
    created = create_key(gateway, default_feature="catalog")
    request_id = f"key-{uuid.uuid4().hex}"
    with sdk_client(gateway.base_url, api_key=created["secret"]) as sdk:
        sdk.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_headers={"X-Request-Id": request_id}
        )  # type: ignore[arg-type]
    assert fake.requests[0].headers["authorization"] == f"Bearer {fake.api_key}"
    (row,) = wait_for_rows(database_url, request_id)
    assert row["api_key_id"] == created["id"]
    assert row["feature"] == "catalog"


def test_pinned_feature(gateway: ThreadedGateway, fake: FakeOpenAI) -> None:
    created = create_key(gateway, default_feature="billing", pin_feature=True)
    with sdk_client(gateway.base_url, api_key=created["secret"]) as sdk:
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers={"X-Feature": "billing"})  # type: ignore[arg-type]
        with pytest.raises(openai.PermissionDeniedError) as caught:
            sdk.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, extra_headers={"X-Feature": "other"}
            )  # type: ignore[arg-type]
    assert caught.value.code == "feature_pinned"
    assert len(fake.requests) == 1


def test_key_allowed_models(gateway: ThreadedGateway, fake: FakeOpenAI) -> None:
    created = create_key(gateway, allowed_models=["gpt-4o-mini"])
    with sdk_client(gateway.base_url, api_key=created["secret"]) as sdk:
        sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
        with pytest.raises(openai.PermissionDeniedError) as caught:
            sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
        listed = [model.id for model in sdk.models.list()]
    assert "gpt-4o" in caught.value.message
    assert listed == ["gpt-4o-mini"]


def test_revoked_key_is_refused_at_once_on_every_replica(
    gateway: ThreadedGateway, start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI
) -> None:
    other = start_gateway()
    created = create_key(gateway)
    headers = {"authorization": f"Bearer {created['secret']}"}
    body = {"model": "gpt-4o", "messages": MESSAGES}
    # Both replicas have the key in their caches.
    for replica in (gateway, other):
        assert (
            httpx.post(replica.base_url + "/chat/completions", json=body, headers=headers).status_code == 200
        )
    revoked = httpx.delete(gateway.url + f"/admin/keys/{created['id']}", headers=MASTER)
    assert revoked.json()["revoked_at"] is not None
    assert httpx.post(gateway.base_url + "/chat/completions", json=body, headers=headers).status_code == 401
    # The other replica hears of it through Postgres NOTIFY, not after its cache expires (30 s).
    wait_until(
        lambda: (
            httpx.post(other.base_url + "/chat/completions", json=body, headers=headers).status_code == 401
        ),
        timeout=3,
    )


def test_expired_key_is_refused(gateway: ThreadedGateway) -> None:
    created = create_key(gateway, expires_at=(datetime.now(UTC) + timedelta(days=1)).isoformat())
    headers = {"authorization": f"Bearer {created['secret']}"}
    assert httpx.get(gateway.base_url + "/models", headers=headers).status_code == 200
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    patched = httpx.patch(
        gateway.url + f"/admin/keys/{created['id']}", json={"expires_at": past}, headers=MASTER
    )
    assert patched.status_code == 200
    response = httpx.get(gateway.base_url + "/models", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_admin_needs_the_master_key(gateway: ThreadedGateway) -> None:
    created = create_key(gateway)
    assert httpx.get(gateway.url + "/admin/keys").status_code == 401
    response = httpx.get(
        gateway.url + "/admin/keys", headers={"authorization": f"Bearer {created['secret']}"}
    )
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "permission_error"
    assert (
        httpx.get(
            gateway.base_url + "/usage", headers={"authorization": f"Bearer {created['secret']}"}
        ).status_code
        == 403
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "n", "rpm_limit": -5}, "rpm_limit"),
        ({"name": "n", "budget_daily_usd": "-0.01"}, "budget_daily_usd"),
        ({"name": "n", "colour": "blue"}, "colour"),
        ({"name": "n" * 10_000}, "name"),
        ({"name": ""}, "name"),
        ({"name": "n", "default_feature": "bad\nfeature"}, "default_feature"),
        ({"name": "n", "pin_feature": True}, None),
        ({"name": "n", "expires_at": "2027-01-01T00:00:00"}, "expires_at"),
        ({}, "name"),
    ],
)
def test_bad_admin_input_is_400_and_changes_nothing(
    body: dict[str, Any], param: str | None, gateway: ThreadedGateway, database_url: str
) -> None:
    (before,) = fetch(database_url, "SELECT COUNT(*) AS n FROM api_keys")
    response = httpx.post(gateway.url + "/admin/keys", json=body, headers=MASTER)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    (after,) = fetch(database_url, "SELECT COUNT(*) AS n FROM api_keys")
    assert after == before


def test_bad_patch_is_400_and_changes_nothing(gateway: ThreadedGateway) -> None:
    created = create_key(gateway, rpm_limit=10)
    url = gateway.url + f"/admin/keys/{created['id']}"
    for body in ({"rpm_limit": 0}, {"name": None}, {"unknown": 1}, {"name": "x" * 129}):
        assert httpx.patch(url, json=body, headers=MASTER).status_code == 400
    assert httpx.get(url, headers=MASTER).json()["rpm_limit"] == 10
    assert (
        httpx.patch(
            gateway.url + "/admin/keys/key_missing", json={"rpm_limit": 5}, headers=MASTER
        ).status_code
        == 404
    )


def test_cli_keys_create_list_revoke(gateway: ThreadedGateway, database_url: str) -> None:
    import os
    import subprocess
    import sys

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
        "DATABASE_URL": database_url,
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "app.cli", "keys", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    created = cli("create", "cli-svc", "--default-feature", "cli", "--rpm-limit", "5")
    assert created.returncode == 0, created.stderr
    key_id = created.stdout.split()[1]
    secret = next(line.split()[1] for line in created.stdout.splitlines() if line.startswith("secret:"))
    headers = {"authorization": f"Bearer {secret}"}
    assert httpx.get(gateway.base_url + "/models", headers=headers).status_code == 200
    listed = cli("list")
    assert key_id in listed.stdout and secret not in listed.stdout
    assert cli("create", "bad", "--rpm-limit", "-1").returncode == 2
    assert cli("revoke", key_id).returncode == 0
    wait_until(lambda: httpx.get(gateway.base_url + "/models", headers=headers).status_code == 401, timeout=3)
    assert "revoked" in cli("list").stdout


def test_key_lookups_do_not_touch_the_database_per_request(
    scratch_db: tuple[str, str], start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI
) -> None:
    name, url = scratch_db
    gateway = start_gateway(database_url=url)
    created = create_key(gateway)
    headers = {"authorization": f"Bearer {created['secret']}"}
    body = {"model": "gpt-4o", "messages": MESSAGES}
    assert httpx.post(gateway.base_url + "/chat/completions", json=body, headers=headers).status_code == 200
    database_down(name)
    try:
        # The key is served from the process's cache; the usage rows wait in the spool meanwhile.
        for _ in range(3):
            response = httpx.post(gateway.base_url + "/chat/completions", json=body, headers=headers)
            assert response.status_code == 200
    finally:
        database_up(name)
    assert len(fake.requests) == 4


def test_unknown_key_during_a_database_outage_is_503_not_500(
    scratch_db: tuple[str, str], start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI
) -> None:
    name, url = scratch_db
    gateway = start_gateway(database_url=url)
    created = create_key(gateway)
    database_down(name)
    try:
        response = httpx.post(
            gateway.base_url + "/chat/completions",
            json={"model": "gpt-4o", "messages": MESSAGES},
            headers={"authorization": f"Bearer {created['secret']}"},
        )
    finally:
        database_up(name)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "key_store_unavailable"
    assert fake.requests == []
