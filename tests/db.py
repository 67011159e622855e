"""Reading the test database from test code (the gateway writes it from its own thread or process)."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from tests.harness import wait_until


def fetch(url: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(url)
        try:
            return [dict(row) for row in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    return asyncio.run(run())


def usage_rows(url: str, *request_ids: str) -> list[dict[str, Any]]:
    return fetch(
        url, "SELECT * FROM usage_events WHERE request_id = ANY($1::text[]) ORDER BY id", list(request_ids)
    )


def wait_for_rows(url: str, *request_ids: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Poll until every request id has its row; the recorder writes in the background."""

    def ready() -> list[dict[str, Any]] | None:
        rows = usage_rows(url, *request_ids)
        return rows if {row["request_id"] for row in rows} >= set(request_ids) else None

    rows: list[dict[str, Any]] = wait_until(ready, timeout=timeout, interval=0.05)
    return rows
