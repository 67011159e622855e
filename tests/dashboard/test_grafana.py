"""The Grafana dashboard and its database role, without Grafana: every panel's SQL, with Grafana's time
macros expanded as Grafana expands them, runs as the read-only role against the seeded month and returns
the rows the seed implies; the role reads the usage tables and can change nothing."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import uuid
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from sqlalchemy.engine import make_url

from app.db.events import UsageEvent
from app.db.readonly_role import scram_sha256_verifier
from tests.dashboard.conftest import Seeded, sql
from tests.db import admin

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "llm-gateway.json"


def panels() -> dict[str, str]:
    board = json.loads(DASHBOARD.read_text())
    return {panel["title"]: panel["targets"][0]["rawSql"] for panel in board["panels"]}


def expand(statement: str, start: datetime, end: datetime) -> str:
    """Grafana's Postgres macros for the time range, as it writes them (RFC 3339 in UTC)."""
    frm, to = (f"'{moment.astimezone(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}'" for moment in (start, end))
    statement = re.sub(r"\$__timeFilter\(([^)]+)\)", rf"\1 BETWEEN {frm} AND {to}", statement)
    statement = statement.replace("$__timeFrom()", frm).replace("$__timeTo()", to)
    assert "$__" not in statement, statement
    return statement


@pytest.fixture(scope="module")
def reader(seeded: Seeded) -> Iterator[str]:
    """The URL of a role made by `llm-gateway migrate --create-readonly-role` on the seeded database."""
    role = f"gw_reader_{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "migrate", "--create-readonly-role", role],
        env={**env, "DATABASE_URL": seeded.url, "GATEWAY_READONLY_ROLE_PASSWORD": "grafana-secret-1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "grafana-secret-1" not in result.stdout + result.stderr
    try:
        yield make_url(seeded.url).set(username=role).render_as_string(hide_password=False)
    finally:
        # Roles belong to the cluster, not to the test's database: revoke its grants, then drop it.
        sql(seeded.url, f'DROP OWNED BY "{role}"')
        admin(f'DROP ROLE IF EXISTS "{role}"')


def days(events: list[UsageEvent]) -> set[datetime]:
    return {datetime.combine(e.created_at.astimezone(UTC).date(), time(), tzinfo=UTC) for e in events}


def cost(events: list[UsageEvent]) -> Decimal:
    return sum((e.cost_usd or Decimal(0) for e in events), Decimal(0))


def by(events: list[UsageEvent], key: Any) -> dict[Any, list[UsageEvent]]:
    groups: dict[Any, list[UsageEvent]] = defaultdict(list)
    for event in events:
        groups[key(event)].append(event)
    return groups


def percentile_cont(values: list[int], fraction: float) -> float:
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def test_every_panel_returns_the_seeded_rows(seeded: Seeded, reader: str) -> None:
    end = datetime.now(UTC)
    queries = panels()
    events = seeded.events

    def run(title: str) -> list[dict[str, Any]]:
        return sql(reader, expand(queries[title], end - timedelta(days=30), end))

    assert run("Cost") == [{"cost_usd": cost(events)}]
    assert run("Requests") == [{"requests": len(events)}]
    assert run("Tokens") == [{"tokens": sum(e.total_tokens for e in events)}]
    failed = [e for e in events if e.status_code >= 400 or e.error_type is not None]
    assert run("Failed calls")[0]["failed_share"] == pytest.approx(len(failed) / len(events))

    daily = {(row["time"], row["metric"]): row["cost_usd"] for row in run("Cost per feature per day")}
    expected_daily = {
        (datetime.combine(day, time(), tzinfo=UTC), feature or "(no feature)"): cost(group)
        for (day, feature), group in by(
            events, lambda e: (e.created_at.astimezone(UTC).date(), e.feature)
        ).items()
    }
    assert daily == expected_daily
    assert {moment for moment, _ in daily} == days(events)

    users = by(events, lambda e: e.user_id)
    expected_users = sorted(
        (
            {
                "user_id": user,
                "requests": len(group),
                "tokens": sum(e.total_tokens for e in group),
                "cost_usd": cost(group),
            }
            for user, group in users.items()
        ),
        key=lambda row: (-row["cost_usd"], row["user_id"] is None, row["user_id"] or ""),
    )[:20]
    assert run("Top users by cost") == expected_users

    models = {row["model"]: row for row in run("Tokens and cost by model")}
    assert models == {
        model: {
            "model": model,
            "requests": len(group),
            "prompt_tokens": sum(e.prompt_tokens for e in group),
            "completion_tokens": sum(e.completion_tokens for e in group),
            "total_tokens": sum(e.total_tokens for e in group),
            "cost_usd": cost(group),
        }
        for model, group in by(events, lambda e: e.model).items()
    }
    assert list(models) == sorted(models, key=lambda m: -models[m]["cost_usd"])

    rows = {row["feature"]: row for row in run("Errors, latency and cache hits per feature")}
    features = by(events, lambda e: e.feature)
    assert set(rows) == set(features)
    for feature, group in features.items():
        row = rows[feature]
        assert row["requests"] == len(group)
        assert row["failed"] == sum(1 for e in group if e.status_code >= 400 or e.error_type is not None)
        assert row["p95_latency_ms"] == pytest.approx(percentile_cont([e.latency_ms for e in group], 0.95))
        prompt = sum(e.prompt_tokens for e in group)
        assert row["cached_share"] == pytest.approx(sum(e.cached_tokens for e in group) / prompt)


def test_the_reconciliation_panel_sets_openai_beside_the_gateway(seeded: Seeded, reader: str) -> None:
    """The panel reads the reconciliation view as the read-only role: a day OpenAI reported five more
    requests of a model than the gateway sent shows the gateway's own count beside OpenAI's."""
    day = (seeded.now - timedelta(days=2)).date()
    model = "gpt-4o-mini"
    sent = [
        e
        for e in seeded.events
        if e.created_at.astimezone(UTC).date() == day and e.upstream_model == model and e.total_tokens > 0
    ]
    assert sent
    sql(
        seeded.url,
        "INSERT INTO provider_usage_days (day, fetched_at, complete) VALUES ($1, now(), true)",
        day,
    )
    sql(
        seeded.url,
        "INSERT INTO provider_usage_daily (day, source, model, requests, fetched_at)"
        " VALUES ($1, 'completions', $2, $3, now())",
        day,
        model,
        len(sent) + 5,
    )
    try:
        end = datetime.now(UTC)
        rows = sql(reader, expand(panels()["Reconciliation with OpenAI"], end - timedelta(days=7), end))
        row = next(row for row in rows if row["model"] == model)
        assert (row["day"], row["gateway_requests"], row["openai_requests"], row["requests_difference"]) == (
            day,
            len(sent),
            len(sent) + 5,
            5,
        )
        assert row["gateway_cost_usd"] == cost(sent)
        assert {row["day"] for row in rows} == {day}
    finally:
        sql(seeded.url, "DELETE FROM provider_usage_daily WHERE day = $1", day)
        sql(seeded.url, "DELETE FROM provider_usage_days WHERE day = $1", day)


def test_a_narrower_range_narrows_every_panel(seeded: Seeded, reader: str) -> None:
    """The macros really filter: the last seven days hold fewer calls than the month, exactly as many as
    the seed put there."""
    # Whole seconds, as Grafana's macros write the range: the events counted here are the ones in it.
    end = datetime.now(UTC).replace(microsecond=0)
    start = end - timedelta(days=6)
    week = [e for e in seeded.events if start <= e.created_at <= end]
    queries = panels()
    assert sql(reader, expand(queries["Requests"], start, end)) == [
        {"requests": sum(1 for e in seeded.events if e.created_at.date() >= start.date())}
    ]
    rows = sql(reader, expand(queries["Errors, latency and cache hits per feature"], start, end))
    assert sum(row["requests"] for row in rows) == len(week) < len(seeded.events)


def test_the_readonly_role_reads_and_changes_nothing(reader: str) -> None:
    async def attempts() -> dict[str, str]:
        conn = await asyncpg.connect(reader)
        outcomes: dict[str, str] = {}
        try:
            assert await conn.fetchval("SELECT count(*) FROM usage_daily") > 0
            assert await conn.fetchval("SELECT count(*) FROM usage_events") > 0
            for name, statement in {
                "insert": "INSERT INTO usage_daily (day, feature) VALUES (now(), 'x')",
                "update": "UPDATE usage_daily SET cost_usd = 0",
                "delete": "DELETE FROM usage_events",
                "read keys": "SELECT * FROM api_keys",
                "create": "CREATE TABLE mine (x int)",
            }.items():
                # In a read-write transaction too: the privileges, not only the session default, refuse.
                for begin in ("BEGIN", "BEGIN READ WRITE"):
                    await conn.execute(begin)
                    try:
                        await conn.execute(statement)
                        outcomes[f"{name} ({begin})"] = "allowed"
                    except asyncpg.PostgresError as exc:
                        outcomes[f"{name} ({begin})"] = type(exc).__name__
                    finally:
                        await conn.execute("ROLLBACK")
        finally:
            await conn.close()
        return outcomes

    with ThreadPoolExecutor(1) as pool:
        outcomes = pool.submit(asyncio.run, attempts()).result()
    assert "allowed" not in outcomes.values(), outcomes
    assert outcomes["update (BEGIN)"] == "ReadOnlySQLTransactionError"
    assert outcomes["update (BEGIN READ WRITE)"] == "InsufficientPrivilegeError"
    assert outcomes["read keys (BEGIN READ WRITE)"] == "InsufficientPrivilegeError"


def test_the_role_password_is_stored_as_a_scram_verifier(seeded: Seeded, reader: str) -> None:
    role = make_url(reader).username
    stored = sql(seeded.url, "SELECT rolpassword FROM pg_authid WHERE rolname = $1", role)[0]["rolpassword"]
    assert stored.startswith("SCRAM-SHA-256$4096:")
    assert "grafana-secret-1" not in stored


def test_the_verifier_matches_rfc_7677() -> None:
    """RFC 7677's example exchange: the client's proof checks out against our StoredKey, and our ServerKey
    signs the exchange as the RFC's server does."""
    verifier = scram_sha256_verifier("pencil", base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="), 4096)
    stored_key, server_key = (base64.b64decode(part) for part in verifier.split("$")[2].split(":"))
    nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    auth_message = (
        f"n=user,r=rOprNGfwEbeRWgbNEkqO,r={nonce},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,r={nonce}"
    ).encode()
    proof = base64.b64decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    client_signature = hmac.digest(stored_key, auth_message, "sha256")
    client_key = bytes(a ^ b for a, b in zip(proof, client_signature, strict=True))
    assert hashlib.sha256(client_key).digest() == stored_key
    assert base64.b64encode(hmac.digest(server_key, auth_message, "sha256")) == (
        b"6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    )


def test_compose_profile_provisions_grafana() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["grafana"]["profiles"] == ["dashboards"]
    assert services["readonly-role"]["command"][:2] == ["migrate", "--create-readonly-role"]
    assert "profiles" not in services["gateway"]
    for volume in services["grafana"]["volumes"]:
        source = volume.split(":")[0]
        if source.startswith("./"):
            assert (ROOT / source).exists(), source
    source = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "llm-gateway.yaml").read_text())
    datasource = source["datasources"][0]
    board = json.loads(DASHBOARD.read_text())
    assert {panel["datasource"]["uid"] for panel in board["panels"]} == {datasource["uid"]}
    assert datasource["secureJsonData"]["password"] == "${GATEWAY_READONLY_ROLE_PASSWORD}"


@pytest.mark.parametrize(
    ("on_postgres", "role", "password", "message"),
    [
        (True, "grafana_reader", None, "set GATEWAY_READONLY_ROLE_PASSWORD"),
        (True, 'x"; DROP TABLE usage_events; --', "pw", "use lower-case letters"),
        (False, "grafana_reader", "pw", "needs Postgres"),
    ],
)
def test_the_role_command_refuses_what_it_cannot_do(
    seeded: Seeded, tmp_path: Path, on_postgres: bool, role: str, password: str | None, message: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_") and k != "DATABASE_URL"}
    env["GATEWAY_DATA_DIR"] = str(tmp_path)  # the embedded SQLite database when DATABASE_URL is unset
    if on_postgres:
        env["DATABASE_URL"] = seeded.url
    if password is not None:
        env["GATEWAY_READONLY_ROLE_PASSWORD"] = password
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "migrate", "--create-readonly-role", role],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert sql(seeded.url, "SELECT count(*) AS n FROM usage_events")[0]["n"] == len(seeded.events)
