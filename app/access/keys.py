"""Gateway keys: created with a secret shown once, stored as a hash, looked up through a short-lived cache.

A request must not cost a database round trip, so a key found (or not found) is cached for a bounded time.
A revocation or change drops the entry at once in this process, and on Postgres a NOTIFY on
`gateway_keys` drops it in every other worker and replica as well; the cache lifetime bounds the staleness
should a notification be missed (the listener reconnects and then clears the whole cache).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from app.access.endpoint_classes import ALL, REPORTS
from app.call.who import ApiKey
from app.db.models import api_keys, usage_events
from app.money import usd

log = logging.getLogger("gateway.keys")

SECRET_PREFIX = "sk-gw-"
_VISIBLE = len(SECRET_PREFIX) + 6
CHANNEL = "gateway_keys"


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def public(key: ApiKey) -> dict[str, Any]:
    """As the admin API shows it: everything but the hash."""
    return {
        "id": key.id,
        "object": "gateway.key",
        "name": key.name,
        "owner": key.owner,
        "prefix": key.prefix,
        "default_feature": key.default_feature,
        "pin_feature": key.pin_feature,
        "allowed_models": list(key.allowed_models) if key.allowed_models is not None else None,
        "scopes": sorted(key.scopes) if key.scopes is not None else _all_scopes(key.reports),
        "rpm_limit": key.rpm_limit,
        "tpm_limit": key.tpm_limit,
        "budget_daily_usd": _money(key.budget_daily_usd),
        "budget_monthly_usd": _money(key.budget_monthly_usd),
        "expires_at": key.expires_at.isoformat() if key.expires_at else None,
        "created_at": key.created_at.isoformat(),
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
        "last_used_at": key.last_used_at.isoformat() if key.last_used_at else None,
    }


def _all_scopes(reports: bool) -> list[str]:
    return [ALL, REPORTS] if reports else [ALL]


def _money(value: Decimal | None) -> str | None:
    return None if value is None else usd(value)


def _row_to_key(row: Any) -> ApiKey:
    models = row.allowed_models
    return ApiKey(
        id=row.id,
        name=row.name,
        owner=row.owner,
        prefix=row.prefix,
        default_feature=row.default_feature,
        pin_feature=bool(row.pin_feature),
        allowed_models=tuple(models) if models is not None else None,
        # NULL: a key made before scopes existed, which keeps calling every class (migration 0004).
        scopes=None if row.scopes is None or ALL in row.scopes else frozenset(row.scopes),
        rpm_limit=row.rpm_limit,
        tpm_limit=row.tpm_limit,
        budget_daily_usd=row.budget_daily_usd,
        budget_monthly_usd=row.budget_monthly_usd,
        expires_at=row.expires_at,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        reports=row.scopes is not None and REPORTS in row.scopes,
        last_used_at=row._mapping.get("last_used_at"),
    )


# The latest usage row of each key: one backward step on the (api_key_id, created_at) index a key.
_LAST_USED = (
    select(func.max(usage_events.c.created_at))
    .where(usage_events.c.api_key_id == api_keys.c.id)
    .scalar_subquery()
    .label("last_used_at")
)


class KeyLookupUnavailable(Exception):
    """The database could not be asked about a key this process has not seen."""


class KeyStore:
    def __init__(
        self, engine: AsyncEngine, *, ttl_s: float = 30.0, miss_ttl_s: float = 2.0, max_entries: int = 10_000
    ) -> None:
        self._engine = engine
        self._ttl_s = ttl_s
        self._miss_ttl_s = miss_ttl_s
        self._max_entries = max_entries
        # secret hash -> (key or None for "no such key", expiry on the monotonic clock)
        self._cache: OrderedDict[str, tuple[ApiKey | None, float]] = OrderedDict()
        # key id -> (key or None, expiry, its secret hash): browser tokens name their key by id. The hash
        # lets a change notified by hash drop this entry too.
        self._by_id: OrderedDict[str, tuple[ApiKey | None, float, str | None]] = OrderedDict()
        self._id_of: dict[str, str] = {}
        self._listener: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._engine.dialect.name == "postgresql":
            self._listener = asyncio.create_task(self._listen(), name="gateway-keys-listener")

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener

    async def authenticate(self, secret: str) -> ApiKey | None:
        """The usable key with this secret, or None (unknown, revoked or expired). While the database
        cannot be reached, a key seen before is served from the cache even past its lifetime (an outage
        of the database must not become an outage of every caller); one never seen raises
        KeyLookupUnavailable."""
        digest = hash_secret(secret)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            key = cached[0]
        else:
            try:
                key = await self._load(digest)
            except Exception as exc:  # any database failure: fall back to what we knew
                if cached is None:
                    raise KeyLookupUnavailable from exc
                log.warning("key lookup failed; using the cached key", extra={"error": type(exc).__name__})
                key = cached[0]
            else:
                self._cache[digest] = (key, now + (self._ttl_s if key is not None else self._miss_ttl_s))
                self._cache.move_to_end(digest)
                while len(self._cache) > self._max_entries:
                    self._cache.popitem(last=False)
        return key if key is not None and key.usable(datetime.now(UTC)) else None

    async def usable_by_id(self, key_id: str) -> ApiKey | None:
        """The usable key with this id, or None: authenticate()'s rules, for a key named by its id."""
        now = time.monotonic()
        cached = self._by_id.get(key_id)
        if cached is not None and cached[1] > now:
            key = cached[0]
        else:
            try:
                async with self._engine.connect() as conn:
                    row = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).first()
            except Exception as exc:  # any database failure: fall back to what we knew
                if cached is None:
                    raise KeyLookupUnavailable from exc
                log.warning("key lookup failed; using the cached key", extra={"error": type(exc).__name__})
                key = cached[0]
            else:
                key = _row_to_key(row) if row is not None else None
                digest = row.secret_hash if row is not None else None
                self._by_id[key_id] = (
                    key,
                    now + (self._ttl_s if key is not None else self._miss_ttl_s),
                    digest,
                )
                self._by_id.move_to_end(key_id)
                if digest is not None:
                    self._id_of[digest] = key_id
                while len(self._by_id) > self._max_entries:
                    _, (_, _, old) = self._by_id.popitem(last=False)
                    if old is not None:
                        self._id_of.pop(old, None)
        return key if key is not None and key.usable(datetime.now(UTC)) else None

    async def _load(self, digest: str) -> ApiKey | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(api_keys).where(api_keys.c.secret_hash == digest))).first()
        return _row_to_key(row) if row is not None else None

    async def create(self, fields: dict[str, Any]) -> tuple[ApiKey, str]:
        secret = new_secret()
        values = {
            **fields,
            "id": "key_" + secrets.token_hex(8),
            "prefix": secret[:_VISIBLE],
            "secret_hash": hash_secret(secret),
            "created_at": datetime.now(UTC),
        }
        async with self._engine.begin() as conn:
            await conn.execute(insert(api_keys).values(**values))
        key = await self.get(values["id"])
        assert key is not None
        return key, secret

    async def get(self, key_id: str) -> ApiKey | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(api_keys, _LAST_USED).where(api_keys.c.id == key_id))).first()
        return _row_to_key(row) if row is not None else None

    async def list(self) -> list[ApiKey]:
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(api_keys, _LAST_USED).order_by(api_keys.c.created_at))).all()
        return [_row_to_key(row) for row in rows]

    async def update(self, key_id: str, changes: dict[str, Any]) -> ApiKey | None:
        return await self._change(key_id, changes)

    async def revoke(self, key_id: str) -> ApiKey | None:
        return await self._change(
            key_id, {"revoked_at": func.coalesce(api_keys.c.revoked_at, datetime.now(UTC))}
        )

    async def _change(self, key_id: str, changes: dict[str, Any]) -> ApiKey | None:
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id)
                .values(**changes)
                .returning(api_keys.c.secret_hash)
            )
            digest = result.scalar_one_or_none()
            if digest is None:
                return None
            if conn.dialect.name == "postgresql":
                # Delivered at commit to every listening worker and replica.
                await conn.execute(
                    text("SELECT pg_notify(:channel, :digest)"), {"channel": CHANNEL, "digest": digest}
                )
        self.forget(digest)
        return await self.get(key_id)

    def forget(self, digest: str) -> None:
        self._cache.pop(digest, None)
        key_id = self._id_of.pop(digest, None)
        if key_id is not None:
            self._by_id.pop(key_id, None)

    async def _listen(self) -> None:
        url = self._engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        delay = 0.5
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(url)
                lost = asyncio.Event()
                conn.add_termination_listener(functools.partial(_set_event, lost))
                await conn.add_listener(CHANNEL, lambda *args: self.forget(str(args[3])))
                # Changes made while nobody listened are unknown: start again from the database. (While
                # it is away the cache stays: its entries' lifetime bounds what could be missed.)
                self._cache.clear()
                self._by_id.clear()
                self._id_of.clear()
                delay = 0.5
                await lost.wait()
            except asyncio.CancelledError:
                raise
            except (
                Exception
            ) as exc:  # any failure: reconnect with backoff, the cache lifetime bounds staleness
                log.warning("key-change listener lost its connection", extra={"error": type(exc).__name__})
            finally:
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await asyncio.shield(conn.close(timeout=1))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)


def _set_event(event: asyncio.Event, *_: object) -> None:
    event.set()
