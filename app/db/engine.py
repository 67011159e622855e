"""The one database engine per process, from DATABASE_URL as users write it."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

_ASYNC_DRIVERS = {"postgresql": "asyncpg", "sqlite": "aiosqlite"}


class UnsupportedDatabase(ValueError):
    """DATABASE_URL names a database the gateway does not speak."""


def async_url(database_url: str | None, data_dir: Path) -> URL:
    """Accept `postgres://`, `postgresql://`, `postgresql+psycopg2://` or a SQLite URL and pick the async
    driver ourselves; unset means an embedded SQLite file under data_dir."""
    if not database_url:
        return make_url(f"sqlite+aiosqlite:///{(data_dir / 'gateway.db').resolve()}")
    if database_url.startswith("postgres://"):
        # Heroku-style URLs: SQLAlchemy dropped the `postgres` dialect alias in 1.4.
        database_url = "postgresql://" + database_url.removeprefix("postgres://")
    url = make_url(database_url)
    backend = url.get_backend_name()
    if backend not in _ASYNC_DRIVERS:
        raise UnsupportedDatabase(f"unsupported database {backend!r}; use postgresql:// or sqlite://")
    return url.set(drivername=f"{backend}+{_ASYNC_DRIVERS[backend]}")


def create_engine(database_url: str | None, data_dir: Path) -> AsyncEngine:
    url = async_url(database_url, data_dir)
    if url.get_backend_name() == "sqlite":
        if url.database:
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        return create_async_engine(url)
    # pool_pre_ping: after a database restart the pool holds dead connections; without the ping the
    # first write after recovery fails once more.
    return create_async_engine(url, pool_size=5, max_overflow=5, pool_pre_ping=True, pool_timeout=5)


async def ping(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


def display_url(database_url: str | None, data_dir: Path) -> str:
    """DATABASE_URL as logs and banners may show it: the password masked."""
    if not database_url:
        return f"embedded SQLite in {data_dir}"
    try:
        return make_url(database_url).render_as_string(hide_password=True)
    except ArgumentError:
        # Not a URL SQLAlchemy can read, so its password cannot be found to mask: show none of it.
        return "(an unreadable DATABASE_URL)"


if __name__ == "__main__":
    # `make run`'s banner.
    import os

    print(display_url(os.environ.get("DATABASE_URL"), Path(os.environ.get("GATEWAY_DATA_DIR", "./var"))))
