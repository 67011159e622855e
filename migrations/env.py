"""Alembic environment: the URL comes from app.db.migrate.upgrade() (Config.attributes) or, for the
`alembic` command line, from DATABASE_URL and GATEWAY_DATA_DIR as the gateway reads them.

Settings is not imported on purpose: it requires GATEWAY_MASTER_KEY, which migrating does not need.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from datetime import UTC, datetime
from logging.config import fileConfig
from pathlib import Path

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from app.db.engine import async_url, create_engine
from app.db.models import metadata
from app.db.partitions import alembic_include_object, ensure_partitions

# Any constant shared by all gateway processes; "llmg" in ASCII.
_MIGRATION_LOCK_KEY = 0x6C6C6D67

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

database_url: str | None = config.attributes.get("database_url", os.environ.get("DATABASE_URL"))
data_dir: Path = config.attributes.get("data_dir", Path(os.environ.get("GATEWAY_DATA_DIR", "./var")))


def run_migrations_offline() -> None:
    context.configure(
        url=async_url(database_url, data_dir),
        target_metadata=metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        include_object=alembic_include_object,
        # SQLite cannot ALTER most things in place; batch mode recreates the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    postgres = connection.dialect.name == "postgresql"
    if postgres:
        # Replicas that start together each run the migrations: all but the first wait here, then find
        # them applied. Held by the session, not a transaction: a migration may commit in steps.
        # Polled, not waited for: a session waiting inside a statement holds a snapshot, which a
        # CREATE INDEX CONCURRENTLY of the session holding the lock would wait for in turn (a deadlock).
        while not connection.execute(
            text("SELECT pg_try_advisory_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
        ).scalar():
            connection.rollback()
            time.sleep(0.2)
        connection.commit()
    try:
        with context.begin_transaction():
            context.run_migrations()
            # Every `llm-gateway migrate` makes the coming months' partitions of usage_events (if it has
            # any). In a savepoint: a lock busy past its timeout must not undo the migrations; the
            # gateway's processes make the partitions in the background as well.
            try:
                with connection.begin_nested():
                    ensure_partitions(connection, datetime.now(UTC).date())
            except DBAPIError as exc:
                print(f"llm-gateway: usage_events partitions not made now ({type(exc.orig).__name__})")
    finally:
        # A connection that broke has lost the lock with its session; its error is the one to show.
        if postgres:
            with contextlib.suppress(DBAPIError):
                connection.rollback()
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK_KEY})
                connection.commit()


async def run_async_migrations() -> None:
    engine = create_engine(database_url, data_dir)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_async_migrations())
