"""Real parts only: a fresh Postgres database per run, the fake OpenAI upstream and the gateway as real
HTTP servers on 127.0.0.1, and the official openai SDK as the client."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from app.config import Settings
from tests.db import ADMIN_URL, create_database, drop_database, masked, postgres_problem
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, NO_BATCH_POLLS, ThreadedGateway
from tests.limits import REDIS_URL, redis_problem


def pytest_collection_finish(session: pytest.Session) -> None:
    """Before any test runs, one line naming what is missing, instead of an error for every test that
    needs it."""
    items = session.items
    if any({"database_url", "scratch_db"} & set(getattr(item, "fixturenames", ())) for item in items):
        problem = postgres_problem()
        if problem:
            pytest.exit(
                f"The tests need Postgres at {masked(ADMIN_URL)} (TEST_DATABASE_URL), which {problem}. Start "
                "one, e.g. `docker run -d -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust postgres:16`, "
                "or point TEST_DATABASE_URL at one.",
                returncode=3,
            )
    if any(getattr(getattr(item, "module", None), "REDIS_URL", None) for item in items):
        problem = redis_problem(REDIS_URL)
        if problem:
            pytest.exit(
                f"The tests need Redis at {REDIS_URL} (TEST_REDIS_URL), which {problem}. Start one, e.g. "
                "`docker run -d -p 6379:6379 redis:7`, or point TEST_REDIS_URL at one.",
                returncode=3,
            )


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A database made for this test run, dropped at its end."""
    name, url = create_database("gateway_test")
    try:
        yield url
    finally:
        drop_database(name)


@pytest.fixture
def scratch_db() -> Iterator[tuple[str, str]]:
    """A database of its own, for a test that cuts its connections or needs it empty: (name, URL)."""
    name, url = create_database("gateway_scratch")
    try:
        yield name, url
    finally:
        drop_database(name)


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def fake(fake_server: FakeOpenAI) -> FakeOpenAI:
    fake_server.reset()
    return fake_server


@pytest.fixture(scope="session")
def make_settings(
    fake_server: FakeOpenAI, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Settings]:
    # A data directory per database, as in production: the spool and batch intents in it are replayed by
    # whichever gateway sharing it looks first, into that gateway's database. One shared by all the
    # tests' gateways had a test's spooled events written to another test's database.
    data_dirs: dict[str | None, Path] = {}

    def make(**overrides: Any) -> Settings:
        url = overrides.get("database_url", database_url)
        if url not in data_dirs:
            data_dirs[url] = tmp_path_factory.mktemp("gateway-data")
        values: dict[str, Any] = {
            "master_key": MASTER_KEY,
            "openai_api_key": fake_server.api_key,
            "openai_base_url": fake_server.base_url,
            "database_url": database_url,
            "data_dir": data_dirs[url],
            # Short waits keep retry tests fast; the policy under test is the same.
            "backoff_initial_s": 0.01,
            "backoff_max_s": 0.05,
            **NO_BATCH_POLLS,
            "log_level": "warning",
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture(scope="session")
def gateway(make_settings: Callable[..., Settings]) -> Iterator[ThreadedGateway]:
    server = ThreadedGateway(make_settings()).start()
    yield server
    server.stop()


@pytest.fixture
def start_gateway(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., ThreadedGateway]]:
    """A gateway with its own settings, for the tests that need other limits or timeouts."""
    started: list[ThreadedGateway] = []

    def start(**overrides: Any) -> ThreadedGateway:
        server = ThreadedGateway(make_settings(**overrides)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def sdk_client(base_url: str, **kwargs: Any) -> openai.OpenAI:
    # max_retries=0: every retry counted at the fake upstream is the gateway's own.
    kwargs.setdefault("api_key", MASTER_KEY)
    kwargs.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=base_url, **kwargs)


@pytest.fixture
def client(gateway: ThreadedGateway) -> Iterator[openai.OpenAI]:
    with sdk_client(gateway.base_url) as sdk:
        yield sdk
