"""A gateway over a database holding a month of seeded usage, keys to read it with, and headless Chromium
(Debian's package, driven by Playwright; `tests/dashboard/install.sh` installs both)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from app.config import Settings
from app.db.events import UsageEvent
from tests.dashboard.seed import seeded_database
from tests.db import fetch
from tests.harness import MASTER_KEY, ThreadedGateway

CHROMIUM = "/usr/bin/chromium"


def sql(url: str, statement: str, *args: Any) -> list[dict[str, Any]]:
    """tests.db.fetch from a thread of its own: Playwright's sync API keeps an event loop running in the
    test's thread, where asyncio.run() refuses to start another."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fetch, url, statement, *args).result()


@dataclass(frozen=True)
class Seeded:
    url: str
    now: datetime
    events: list[UsageEvent]
    gateway: ThreadedGateway
    reports_key: str


def make_key(gateway: ThreadedGateway, scopes: list[str]) -> str:
    response = httpx.post(
        gateway.url + "/admin/keys",
        json={"name": f"dashboard-{'-'.join(scopes)}", "scopes": scopes},
        headers={"authorization": f"Bearer {MASTER_KEY}"},
    )
    assert response.status_code == 201, response.text
    secret: str = response.json()["secret"]
    return secret


@pytest.fixture(scope="package")
def seeded(make_settings: Callable[..., Settings]) -> Iterator[Seeded]:
    # Set up before the browser: seeding runs event loops of its own.
    now = datetime.now(UTC)
    with seeded_database("gateway_dashboard", now) as (_, url, events):
        gateway = ThreadedGateway(make_settings(database_url=url)).start()
        try:
            yield Seeded(url, now, events, gateway, make_key(gateway, ["reports"]))
        finally:
            gateway.stop()


# Module-scoped: while it is open, Playwright keeps an event loop running in the tests' thread, and code
# that calls asyncio.run() (the seeding, the migrations) must not run in that module.
@pytest.fixture(scope="module")
def browser(seeded: Seeded) -> Iterator[Any]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: run tests/dashboard/install.sh (make test does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: CI runs the suite as root, where Chromium's sandbox refuses to start.
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()
