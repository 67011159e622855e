"""Reading the test database from test code (the gateway writes it from its own thread or process)."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from app.db.migrate import upgrade
from tests.harness import wait_until

ADMIN_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


def plain_url(url: str) -> str:
    """The URL asyncpg takes: no SQLAlchemy driver suffix."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def masked(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def postgres_problem() -> str | None:
    """Why the test server cannot be used, in a few words; None when it can."""

    async def probe() -> None:
        conn = await asyncpg.connect(plain_url(ADMIN_URL), timeout=5)
        await conn.close()

    try:
        asyncio.run(probe())
    except Exception as exc:  # whatever the reason, the suite cannot run; say which
        return f"cannot be reached ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


def admin(*statements: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(plain_url(ADMIN_URL))
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


def database_url_for(name: str) -> str:
    return make_url(plain_url(ADMIN_URL)).set(database=name).render_as_string(hide_password=False)


def create_database(prefix: str, *, migrated: bool = True) -> tuple[str, str]:
    """A new database, migrated unless told otherwise: (name, URL)."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin(f'CREATE DATABASE "{name}"')
    url = database_url_for(name)
    if migrated:
        upgrade(url, Path("unused-for-postgres"))
    return name, url


def drop_database(name: str) -> None:
    admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true', f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_down(name: str) -> None:
    """No new connections to the database, and every open one cut: an outage, as the gateway sees it."""
    admin(
        f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false',
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'",
    )


def database_up(name: str) -> None:
    admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


def fetch(url: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(url)
        try:
            return [dict(row) for row in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    return asyncio.run(run())


def usage_rows(url: str, *request_ids: str) -> list[dict[str, Any]]:
    """Rows by the X-Request-Id the test sent (client_request_id), or by the gateway's own request_id."""
    return fetch(
        url,
        "SELECT * FROM usage_events WHERE client_request_id = ANY($1::text[]) OR request_id = ANY($1::text[])"
        " ORDER BY id",
        list(request_ids),
    )


def wait_for_rows(url: str, *request_ids: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Poll until every request id has its row; the recorder writes in the background."""

    def ready() -> list[dict[str, Any]] | None:
        rows = usage_rows(url, *request_ids)
        found = {row["client_request_id"] or row["request_id"] for row in rows}
        return rows if found >= set(request_ids) else None

    rows: list[dict[str, Any]] = wait_until(ready, timeout=timeout, interval=0.05)
    return rows


class HangingProxy:
    """A TCP proxy in front of Postgres that can stop answering: connections stay open and new ones are
    accepted, but no byte goes through either way. That is an unreachable database as a gateway sees a
    network partition: nothing refuses, everything waits."""

    def __init__(self, url: str) -> None:
        target = make_url(url)
        self._host, self._port = target.host or "127.0.0.1", target.port or 5432
        self._target = target
        self._hung = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.url = ""

    def __enter__(self) -> HangingProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop
        ).result()
        port = self._server.sockets[0].getsockname()[1]
        self.url = self._target.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
        return self

    def hang(self) -> None:
        self._hung.set()

    def __exit__(self, *_: object) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for writer in self._writers:
                writer.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        if self._hung.is_set():
            await asyncio.Event().wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        except OSError:
            writer.close()
            return
        self._writers.append(up_writer)
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            if self._hung.is_set():
                await asyncio.Event().wait()
            writer.write(data)
            await writer.drain()
        writer.close()
