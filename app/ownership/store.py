"""Who owns each upstream object: the `resource_owners` table, read through a bounded cache.

Every access to an object asks who owns it, so the answer must not cost a database round trip: an
owner once found is cached until evicted (ownership never changes; an upstream id is never reused), and
"no owner" for a short time only, since another worker or replica may record that id a moment later.
Creations are rare and are written before the client sees the new id.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Iterable
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db.models import resource_owners
from app.errors import GatewayError

log = logging.getLogger("gateway.ownership")

# Ids per SELECT when a list answer holds many this process has not seen.
_LOOKUP_CHUNK = 500


def _unavailable() -> GatewayError:
    return GatewayError(
        503,
        "The gateway cannot check who owns this object right now; try again shortly.",
        code="ownership_unavailable",
    )


class OwnerStore:
    def __init__(self, engine: AsyncEngine, *, max_entries: int = 50_000, miss_ttl_s: float = 2.0) -> None:
        self._engine = engine
        self._max_entries = max_entries
        self._miss_ttl_s = miss_ttl_s
        # resource id -> (owning key id, or None for "no owner", and when that "None" expires)
        self._cache: OrderedDict[str, tuple[str | None, float]] = OrderedDict()

    async def owners(self, resource_ids: Iterable[str]) -> dict[str, str | None]:
        """The owning key id of each resource (None: no gateway key owns it). Fails closed with a 503
        when the database cannot be asked about an id this process has no answer for."""
        now = time.monotonic()
        found: dict[str, str | None] = {}
        missing: list[str] = []
        for resource_id in resource_ids:
            cached = self._cache.get(resource_id)
            if cached is not None and (cached[0] is not None or cached[1] > now):
                found[resource_id] = cached[0]
                self._cache.move_to_end(resource_id)
            else:
                missing.append(resource_id)
        if missing:
            try:
                loaded = await self._load(missing)
            except Exception as exc:  # any database failure: refuse rather than guess
                log.warning("owner lookup failed", extra={"error": type(exc).__name__})
                raise _unavailable() from exc
            for resource_id in missing:
                owner = loaded.get(resource_id)
                found[resource_id] = owner
                self._remember(resource_id, owner, now)
        return found

    async def owner(self, resource_id: str) -> str | None:
        return (await self.owners((resource_id,)))[resource_id]

    async def record(
        self, resource_ids: Iterable[str], kind: str, api_key_id: str, feature: str | None
    ) -> None:
        """Owned by `api_key_id` from now on; ids already recorded keep their owner."""
        fresh = [rid for rid in dict.fromkeys(resource_ids) if self._known(rid) != api_key_id]
        if not fresh:
            return
        created = datetime.now(UTC)
        rows = [
            {
                "resource_id": rid,
                "kind": kind,
                "api_key_id": api_key_id,
                "feature": feature,
                "created_at": created,
            }
            for rid in fresh
        ]
        dialect = postgresql if self._engine.dialect.name == "postgresql" else sqlite
        statement = (
            dialect.insert(resource_owners)
            .values(rows)
            .on_conflict_do_nothing()
            .returning(resource_owners.c.resource_id)
        )
        try:
            async with self._engine.begin() as conn:
                inserted = set((await conn.execute(statement)).scalars())
        except Exception as exc:  # the client must not get an id nobody recorded
            log.error(
                "could not record new objects' owner", extra={"error": type(exc).__name__, "ids": fresh}
            )
            raise GatewayError(
                503,
                "The gateway could not record who owns the new object; it was created upstream but is not "
                "yours to use. Try again shortly.",
                code="ownership_unavailable",
            ) from exc
        now = time.monotonic()
        for rid in inserted:
            self._remember(rid, sys.intern(api_key_id), now)
        if len(inserted) < len(fresh):
            # Recorded before (a batch's output file seen in another worker, say): learn by whom.
            earlier = [rid for rid in fresh if rid not in inserted]
            self._cache.update((rid, (None, 0.0)) for rid in earlier)
            await self.owners(earlier)

    def _known(self, resource_id: str) -> str | None:
        cached = self._cache.get(resource_id)
        return cached[0] if cached is not None else None

    def _remember(self, resource_id: str, owner: str | None, now: float) -> None:
        self._cache[resource_id] = (owner, now + self._miss_ttl_s)
        self._cache.move_to_end(resource_id)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)

    async def _load(self, resource_ids: list[str]) -> dict[str, str | None]:
        loaded: dict[str, str | None] = {}
        async with self._engine.connect() as conn:
            for start in range(0, len(resource_ids), _LOOKUP_CHUNK):
                chunk = resource_ids[start : start + _LOOKUP_CHUNK]
                rows = await conn.execute(
                    select(resource_owners.c.resource_id, resource_owners.c.api_key_id).where(
                        resource_owners.c.resource_id.in_(chunk)
                    )
                )
                # Interned: a few keys own every cached object, so the cache holds one copy of each key id.
                loaded.update((row[0], sys.intern(row[1])) for row in rows)
        return loaded
