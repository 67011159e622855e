"""Run the Alembic migrations from code, whatever the working directory."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

import app
from app.db.engine import create_engine

# migrations/ sits next to the app package in the repository, which is also where an editable install
# imports the package from. An installed package (the Docker image) names the folder instead.
MIGRATIONS_DIR = Path(
    os.environ.get("GATEWAY_MIGRATIONS_DIR") or Path(app.__file__).resolve().parent.parent / "migrations"
)


def alembic_config(database_url: str | None, data_dir: Path) -> Config:
    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise RuntimeError(
            f"migrations not found at {MIGRATIONS_DIR}: install the gateway with `pip install -e .` "
            "or set GATEWAY_MIGRATIONS_DIR to the repository's migrations/ folder"
        )
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Passed as attributes, not main options: the ini parser would interpolate a '%' in a password.
    config.attributes["database_url"] = database_url
    config.attributes["data_dir"] = data_dir
    return config


def upgrade(database_url: str | None, data_dir: Path) -> None:
    """`alembic upgrade head`. Blocking, and it runs its own event loop: from async code call it through
    asyncio.to_thread()."""
    command.upgrade(alembic_config(database_url, data_dir), "head")


# SQLSTATEs of a statement naming a table or column the database does not have: the schema is older than
# the code (42P01 undefined_table, 42703 undefined_column).
SCHEMA_SQLSTATES = frozenset({"42P01", "42703"})
_VERSION_TABLE = "alembic_version"
BEHIND = "schema is behind: run `llm-gateway migrate`"


def is_schema_error(exc: BaseException) -> bool:
    """True when a statement failed because a table or column this code uses is not in the database."""
    cause = getattr(exc, "orig", None) or exc
    if getattr(cause, "sqlstate", None) in SCHEMA_SQLSTATES:
        return True
    # SQLite has no SQLSTATE.
    return type(cause).__name__ == "OperationalError" and str(cause).startswith(
        ("no such table", "no such column")
    )


def head_revisions() -> frozenset[str]:
    """The revisions a database must be at for this code: the heads of migrations/."""
    return frozenset(ScriptDirectory.from_config(alembic_config(None, Path())).get_heads())


def _known_revisions() -> frozenset[str]:
    script = ScriptDirectory.from_config(alembic_config(None, Path()))
    return frozenset(rev.revision for rev in script.walk_revisions())


async def database_revisions(engine: AsyncEngine) -> frozenset[str]:
    """The revisions recorded in the database (none in one never migrated). Raises when it cannot be
    reached."""
    async with engine.connect() as conn:
        return frozenset(await conn.run_sync(_current_heads))


def _current_heads(conn: Connection) -> list[str]:
    # Read directly: alembic's MigrationContext would log two lines at every readiness probe.
    if not inspect(conn).has_table(_VERSION_TABLE):
        return []
    return list(conn.execute(text(f"SELECT version_num FROM {_VERSION_TABLE}")).scalars())


def is_behind(database: frozenset[str], heads: frozenset[str], known: frozenset[str]) -> bool:
    """True when a migration of this code has not been applied. A revision this code does not know is
    a newer one (a newer release migrated, this one still runs during a rolling deploy): not behind."""
    return not database or any(rev in known and rev not in heads for rev in database)


class SchemaCheck:
    """Whether the database's schema is the one this code needs: the heads are read from migrations/
    once per process, the database's revision on every check (readiness asks)."""

    def __init__(self) -> None:
        self.heads = head_revisions()
        self.known = _known_revisions()

    async def behind(self, engine: AsyncEngine) -> bool:
        return is_behind(await database_revisions(engine), self.heads, self.known)


def upgrade_reporting(database_url: str | None, data_dir: Path) -> list[str]:
    """`upgrade()`, returning what it applied, oldest first, each as `rev: its title`; [] when the
    database was at the latest schema already."""
    config = alembic_config(database_url, data_dir)
    before = asyncio.run(_revisions_at(database_url, data_dir))
    command.upgrade(config, "head")
    after = asyncio.run(_revisions_at(database_url, data_dir))
    script = ScriptDirectory.from_config(config)

    def lineage(revisions: frozenset[str]) -> set[str]:
        if not revisions:
            return set()
        return {rev.revision for rev in script.iterate_revisions(tuple(revisions), "base")}

    new = lineage(after) - lineage(before)
    return [
        f"{rev.revision}: {(rev.doc or '').strip().splitlines()[0] if rev.doc else ''}".rstrip(": ")
        for rev in reversed(list(script.walk_revisions()))
        if rev.revision in new
    ]


async def _revisions_at(database_url: str | None, data_dir: Path) -> frozenset[str]:
    engine = create_engine(database_url, data_dir)
    try:
        return await database_revisions(engine)
    finally:
        await engine.dispose()
