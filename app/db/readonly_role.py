"""A Postgres role that can read the usage tables and nothing else, for dashboards (Grafana, BI tools).

`llm-gateway migrate --create-readonly-role NAME` creates it (or, when it exists, sets its password and
grants again), with the password from GATEWAY_READONLY_ROLE_PASSWORD. The password never reaches the
server in the clear: it is sent as a SCRAM-SHA-256 verifier computed here, as psql's \\password does, so
it cannot end up in a server log or in pg_stat_activity.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

PASSWORD_ENV = "GATEWAY_READONLY_ROLE_PASSWORD"
# What dashboards read. api_keys (key hashes) and resource_owners stay out of its sight.
REPORTING_TABLES = ("usage_events", "usage_daily", "reconciliation_daily")
# Postgres' own defaults for a verifier it computes.
_ITERATIONS = 4096
_SALT_BYTES = 16
_ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def check_role_name(name: str) -> str:
    """A plain lower-case identifier, so it can be quoted into DDL (roles take no bind parameters)."""
    if not _ROLE_NAME.fullmatch(name):
        raise ValueError(f"role name {name!r}: use lower-case letters, digits and _ (at most 63)")
    return name


def scram_sha256_verifier(password: str, salt: bytes | None = None, iterations: int = _ITERATIONS) -> str:
    """The string Postgres stores for a SCRAM-SHA-256 password (RFC 5802 / RFC 7677 keys)."""
    salt = salt if salt is not None else secrets.token_bytes(_SALT_BYTES)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored_key = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    b64 = base64.b64encode
    return (
        f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}"
        f"${b64(stored_key).decode()}:{b64(server_key).decode()}"
    )


async def create_readonly_role(engine: AsyncEngine, name: str, password: str) -> None:
    """Create or update role `name`: it logs in, reads REPORTING_TABLES, and its sessions are read-only
    with a statement timeout. Run after the migrations, which create the tables."""
    if engine.dialect.name != "postgresql":
        raise ValueError("a read-only role needs Postgres (DATABASE_URL); SQLite has no roles")
    if not password:
        raise ValueError(f"set {PASSWORD_ENV} to the role's password")
    role = f'"{check_role_name(name)}"'
    verifier = scram_sha256_verifier(password)
    async with engine.begin() as conn:
        exists = (await conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :n"), {"n": name})).first()
        database = (await conn.execute(text("SELECT current_database()"))).scalar_one()
        schema = (await conn.execute(text("SELECT current_schema()"))).scalar_one()
        # Roles take no bind parameters. The name is checked above and the verifier is base64 and '$:'
        # only, so both are safe inside the statement; sent as they are (no SQLAlchemy parsing of ':').
        for statement in (
            f"{'ALTER' if exists else 'CREATE'} ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
            f"PASSWORD '{verifier}'",
            f"ALTER ROLE {role} SET default_transaction_read_only = on",
            f"ALTER ROLE {role} SET statement_timeout = '30s'",
            f"GRANT CONNECT ON DATABASE {_quote(database)} TO {role}",
            f"GRANT USAGE ON SCHEMA {_quote(schema)} TO {role}",
            f"GRANT SELECT ON {', '.join(_quote(table) for table in REPORTING_TABLES)} TO {role}",
        ):
            await conn.exec_driver_sql(statement)


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
