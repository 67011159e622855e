"""Run the Alembic migrations from code, whatever the working directory."""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config

import app

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
