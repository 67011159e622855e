"""Reconciliation with OpenAI's own usage: calls metered by the gateway against what the fake upstream's
organization Usage and Costs APIs report (the calls it served, and what a test plants), over HTTP, into a
database of its own."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from app.config import Settings
from app.db.engine import create_engine
from app.db.migrate import upgrade
from app.db.models import usage_events
from app.logs import JsonFormatter
from app.reconcile import store
from app.reconcile.job import Reconciler, organization_reader, reconcile
from app.reconcile.provider import MAX_PAGES, ProviderError, line_item_model
from app.upstream import UpstreamClient
from tests.db import fetch, wait_for_rows
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, ThreadedGateway, wait_until

README = Path(__file__).resolve().parents[2] / "README.md"
MINI = "gpt-4o-mini-2024-07-18"
EMBEDDING = "text-embedding-3-small"
# (prompt, cached, completion) of the chat calls made through the gateway.
CHATS = [(1000, 0, 100), (2000, 400, 200), (300, 0, 30)]


def _today() -> date:
    return datetime.now(UTC).date()


def _cost(prompt: int, cached: int, completion: int) -> Decimal:
    return (
        (prompt - cached) * Decimal("0.15") + cached * Decimal("0.075") + completion * Decimal("0.60")
    ) / (1_000_000)


@pytest.fixture
def metered(
    fake: FakeOpenAI, scratch_db: tuple[str, str], make_settings: Callable[..., Settings]
) -> Iterator[tuple[str, ThreadedGateway]]:
    """A gateway on a database of its own that has metered CHATS and two embeddings today."""
    url = scratch_db[1]
    gateway = ThreadedGateway(make_settings(database_url=url)).start()
    ids = []
    try:
        with openai.OpenAI(base_url=gateway.base_url, api_key=MASTER_KEY, max_retries=0) as sdk:
            for prompt, cached, completion in CHATS:
                ids.append(f"recon-{uuid.uuid4().hex}")
                usage = {"prompt_tokens": prompt, "completion_tokens": completion, "cached_tokens": cached}
                fake.reply("ok", usage=usage)
                sdk.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": "x"}],
                    extra_headers={"X-Request-Id": ids[-1]},
                )
            for words in ("one two three", "four five"):
                ids.append(f"recon-{uuid.uuid4().hex}")
                sdk.embeddings.create(model=EMBEDDING, input=words, extra_headers={"X-Request-Id": ids[-1]})
        wait_for_rows(url, *ids)
        yield url, gateway
    finally:
        gateway.stop()


def _cli(
    fake: FakeOpenAI, url: str, *args: str, admin_key: str | None = None, **more_env: str
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OPENAI_"))}
    env |= more_env | {
        "GATEWAY_MASTER_KEY": MASTER_KEY,
        "OPENAI_BASE_URL": fake.base_url,
        "OPENAI_API_KEY": fake.api_key,
        "OPENAI_ADMIN_KEY": admin_key or fake.organization.admin_key,
        "DATABASE_URL": url,
        "GATEWAY_BACKOFF_INITIAL_S": "0.01",
        "GATEWAY_BACKOFF_MAX_S": "0.05",
    }
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "reconcile", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _by_day_model(stdout: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(row["day"], row["model"]): row for row in json.loads(stdout)}


def test_a_planted_discrepancy_is_found_per_day_and_model(
    fake: FakeOpenAI, metered: tuple[str, ThreadedGateway]
) -> None:
    url, _ = metered
    today, past = _today(), _today() - timedelta(days=3)
    # Traffic that bypassed the gateway today, and a day OpenAI billed that the gateway never saw.
    fake.organization.plant(today, MINI, requests=4, input_tokens=5000, output_tokens=500)
    fake.organization.plant(past, "gpt-4o-2024-08-06", requests=2, input_tokens=100, output_tokens=10)
    # Two daily buckets a page: seven days take four pages per endpoint.
    fake.organization.page_buckets = 2

    result = _cli(fake, url, "--since", "7d", "--format", "json")
    assert result.returncode == 0, result.stderr
    rows = _by_day_model(result.stdout)

    mini = rows[(today.isoformat(), MINI)]
    assert (mini["gateway_requests"], mini["openai_requests"], mini["requests_difference"]) == (3, 7, 4)
    assert mini["gateway_input_tokens"] == sum(c[0] for c in CHATS)
    assert mini["input_tokens_difference"] == 5000
    assert mini["gateway_cached_tokens"] == mini["openai_cached_tokens"] == 400
    assert mini["output_tokens_difference"] == 500
    gateway_cost = sum((_cost(*c) for c in CHATS), Decimal(0))
    planted_cost = _cost(5000, 0, 500)
    assert Decimal(mini["gateway_cost_usd"]) == gateway_cost
    assert Decimal(mini["openai_cost_usd"]) == gateway_cost + planted_cost
    assert Decimal(mini["cost_difference_usd"]) == planted_cost
    assert mini["cost_relative_difference"] == pytest.approx(
        float(planted_cost / (gateway_cost + planted_cost))
    )

    embedding = rows[(today.isoformat(), EMBEDDING)]
    assert embedding["gateway_requests"] == embedding["openai_requests"] == 2
    assert embedding["gateway_input_tokens"] == embedding["openai_input_tokens"] == 5
    assert Decimal(embedding["cost_difference_usd"]) == 0

    missed = rows[(past.isoformat(), "gpt-4o-2024-08-06")]
    assert (missed["gateway_requests"], missed["openai_requests"]) == (0, 2)
    assert Decimal(missed["openai_cost_usd"]) == (100 * Decimal("2.5") + 10 * Decimal(10)) / 1_000_000
    assert len(rows) == 3

    pages = [r for r in fake.requests if r.path == "/v1/organization/usage/completions"]
    assert len(pages) == 4
    assert [r.query.get("page") is not None for r in pages] == [False, True, True, True]
    assert {r.query["group_by"] for r in pages} == {"model"}


def test_reading_the_same_days_again_replaces_them(
    fake: FakeOpenAI, metered: tuple[str, ThreadedGateway]
) -> None:
    url, _ = metered
    fake.organization.plant(_today(), MINI, requests=1, input_tokens=10)
    first = _cli(fake, url, "--since", "3d", "--format", "json")
    stored = fetch(url, "SELECT * FROM provider_usage_daily ORDER BY day, source, model, line_item")
    second = _cli(fake, url, "--since", "3d", "--format", "json")
    assert first.returncode == second.returncode == 0
    assert json.loads(second.stdout) == json.loads(first.stdout)
    again = fetch(url, "SELECT * FROM provider_usage_daily ORDER BY day, source, model, line_item")
    assert [dict(r, fetched_at=None) for r in again] == [dict(r, fetched_at=None) for r in stored]
    assert len(fetch(url, "SELECT * FROM provider_usage_days")) == 3
    # OpenAI revised the day: the new numbers replace the old, they are not added to them.
    fake.organization.plant(_today(), MINI, requests=1, input_tokens=10)
    third = _by_day_model(_cli(fake, url, "--since", "3d", "--format", "json").stdout)
    assert third[(_today().isoformat(), MINI)]["openai_requests"] == len(CHATS) + 2


def test_the_cli_table_and_the_readme_query(fake: FakeOpenAI, metered: tuple[str, ThreadedGateway]) -> None:
    url, _ = metered
    fake.organization.plant(_today(), MINI, requests=4, input_tokens=5000, output_tokens=500)
    result = _cli(fake, url, "--since", "2d")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == [
        "day",
        "model",
        "gateway_requests",
        "openai_requests",
        "requests_difference",
    ]
    mini = next(line.split() for line in lines if MINI in line)
    assert mini[2:5] == ["3", "7", "4"]
    assert any("(day total)" in line for line in lines)
    # Later, from what was stored, asking OpenAI nothing.
    asked = len(fake.requests)
    stored = _cli(fake, url, "--since", "2d", "--no-fetch", "--format", "csv")
    assert len(fake.requests) == asked
    table = list(csv.DictReader(io.StringIO(stored.stdout)))
    assert {row["model"]: row["requests_difference"] for row in table} == {MINI: "4", EMBEDDING: "0"}

    section = README.read_text().split("## Reconciliation with OpenAI", 1)[1].split("\n## ", 1)[0]
    (query,) = re.findall(r"```sql\n(.*?)```", section, flags=re.S)
    rows = {row["model"]: row for row in fetch(url, query)}
    assert rows[MINI]["requests_difference"] == 4
    assert rows[EMBEDDING]["cost_difference_usd"] == 0


def test_the_project_filter_leaves_out_traffic_that_bypassed_the_gateway(
    fake: FakeOpenAI, metered: tuple[str, ThreadedGateway]
) -> None:
    url, _ = metered
    fake.organization.plant(_today(), MINI, requests=5, input_tokens=50, project="proj_notebooks")
    everything = _by_day_model(_cli(fake, url, "--since", "1d", "--format", "json").stdout)
    assert everything[(_today().isoformat(), MINI)]["requests_difference"] == 5

    narrowed = _by_day_model(
        _cli(
            fake, url, "--since", "1d", "--format", "json", GATEWAY_RECONCILE_PROJECT_IDS="proj_gateway"
        ).stdout
    )
    assert narrowed[(_today().isoformat(), MINI)]["requests_difference"] == 0
    assert fake.requests[-1].query["project_ids"] == "proj_gateway"


def test_a_model_key_is_refused_and_no_key_is_printed(fake: FakeOpenAI, scratch_db: tuple[str, str]) -> None:
    for key, status in ((fake.api_key, 403), ("sk-admin-wrong-key-9876", 401)):
        result = _cli(fake, scratch_db[1], "--since", "1d", admin_key=key)
        assert result.returncode == 1
        assert result.stderr.startswith(
            f"llm-gateway reconcile: /organization/usage/completions: OpenAI answered {status}"
        )
        assert key not in result.stderr + result.stdout
        assert key[-4:] not in result.stderr, "OpenAI's masked key would be printed"
    # Nothing was stored from a refused read.
    assert fetch(scratch_db[1], "SELECT * FROM provider_usage_days") == []


def test_the_admin_key_goes_only_to_the_organization_endpoints(
    fake: FakeOpenAI, metered: tuple[str, ThreadedGateway]
) -> None:
    url, _ = metered
    assert _cli(fake, url, "--since", "1d").returncode == 0
    admin = f"Bearer {fake.organization.admin_key}"
    organization = [r for r in fake.requests if r.path.startswith("/v1/organization/")]
    assert {r.path for r in organization} == {
        "/v1/organization/usage/completions",
        "/v1/organization/usage/embeddings",
        "/v1/organization/costs",
    }
    assert all(r.headers["authorization"] == admin for r in organization)
    others = [r for r in fake.requests if not r.path.startswith("/v1/organization/")]
    assert others, "the gateway's calls were recorded"
    assert all(r.headers.get("authorization") != admin for r in others)


def _read(settings: Settings, start: date, end: date) -> int:
    """One reconciliation run, in a loop of its own (as the CLI runs it)."""

    async def run() -> int:
        upstream = UpstreamClient(settings)
        await upstream.start()
        engine = create_engine(settings.database_url, settings.data_dir)
        try:
            return await reconcile(engine, organization_reader(settings, upstream), start, end, 10.0)
        finally:
            await upstream.close()
            await engine.dispose()

    return asyncio.run(run())


@pytest.fixture
def reader_settings(
    fake: FakeOpenAI, scratch_db: tuple[str, str], make_settings: Callable[..., Settings]
) -> Settings:
    return make_settings(database_url=scratch_db[1], openai_admin_key=fake.organization.admin_key)


def test_bounded_reads_fail_whole_and_keep_what_was_stored(
    fake: FakeOpenAI, reader_settings: Settings
) -> None:
    url = reader_settings.database_url
    assert url is not None
    today = _today()
    fake.organization.plant(today, MINI, requests=1, input_tokens=10)
    _read(reader_settings, today, today + timedelta(days=1))
    before = fetch(url, "SELECT * FROM provider_usage_daily ORDER BY source, model, line_item")
    assert before

    fake.organization.endless_pages = True  # has_more forever, the same cursor
    with pytest.raises(ProviderError, match="has_more without a new next_page"):
        _read(reader_settings, today, today + timedelta(days=1))
    fake.organization.endless_pages = False

    fake.organization.page_buckets = 1  # a page a day: a year would take 366 pages
    with pytest.raises(ProviderError, match=f"more than {MAX_PAGES} pages"):
        _read(reader_settings, today - timedelta(days=200), today + timedelta(days=1))
    assert len([r for r in fake.requests if r.path.endswith("/completions")]) == 3 + MAX_PAGES
    fake.organization.page_buckets = None

    fake.fail(200, body=b"x" * (5 * 1024 * 1024), method="GET")
    with pytest.raises(ProviderError, match="larger than"):
        _read(reader_settings, today, today + timedelta(days=1))
    fake.fail(200, body={"object": "list", "data": []}, method="GET")
    with pytest.raises(ProviderError, match="not a page of buckets"):
        _read(reader_settings, today, today + timedelta(days=1))
    midnight = int(datetime(today.year, today.month, today.day, tzinfo=UTC).timestamp())
    huge = {"input_tokens": 10**20, "num_model_requests": 1}
    bucket = {"object": "bucket", "start_time": midnight, "end_time": midnight + 86400, "results": [huge]}
    fake.fail(200, body={"object": "page", "data": [bucket], "has_more": False}, method="GET")
    with pytest.raises(ProviderError, match="malformed: input_tokens"):
        _read(reader_settings, today, today + timedelta(days=1))
    with pytest.raises(ProviderError, match="1 to 366 days"):
        _read(reader_settings, today - timedelta(days=400), today)

    after = fetch(url, "SELECT * FROM provider_usage_daily ORDER BY source, model, line_item")
    assert after == before


def test_a_rate_limited_page_is_retried(fake: FakeOpenAI, reader_settings: Settings) -> None:
    fake.fail(429, method="GET", headers={"retry-after-ms": "10"})
    today = _today()
    fake.organization.plant(today, MINI, requests=1, input_tokens=10)
    assert _read(reader_settings, today, today + timedelta(days=1)) > 0
    assert [r.status for r in fake.requests][:2] == [429, 200]


def test_only_a_stale_read_asks_openai_again(fake: FakeOpenAI, reader_settings: Settings) -> None:
    """What keeps several workers from each reading OpenAI: the last read, in the database."""

    async def run_twice() -> list[int]:
        upstream = UpstreamClient(reader_settings)
        await upstream.start()
        engine = create_engine(reader_settings.database_url, reader_settings.data_dir)
        try:
            job = Reconciler(reader_settings, upstream, engine, CollectorRegistry())
            asked = []
            for _ in range(2):
                await job.run_once()
                asked.append(len(fake.requests))
            return asked
        finally:
            await upstream.close()
            await engine.dispose()

    assert asyncio.run(run_twice()) == [3, 3]


def test_the_background_job_exposes_the_latest_complete_day(
    fake: FakeOpenAI,
    scratch_db: tuple[str, str],
    start_gateway: Callable[..., ThreadedGateway],
    gateway_log: list[str],
) -> None:
    url = scratch_db[1]
    yesterday = _today() - timedelta(days=1)
    # The gateway metered one call yesterday; OpenAI counts two, with more tokens.
    noon = datetime(yesterday.year, yesterday.month, yesterday.day, 12, tzinfo=UTC)
    fetch(
        url,
        """INSERT INTO usage_events (created_at, request_id, endpoint, model, upstream_model, stream,
               status_code, attempts, prompt_tokens, completion_tokens, total_tokens, usage_source, cost_usd,
               latency_ms)
           VALUES ($1, $2, '/v1/chat/completions', 'gpt-4o-mini', $3, false, 200, 1, 800, 100, 900,
                   'upstream', $4, 10)""",
        noon,
        f"req_{uuid.uuid4().hex}",
        MINI,
        _cost(800, 0, 100),
    )
    fake.organization.plant(yesterday, MINI, requests=2, input_tokens=1000, output_tokens=100)
    gateway = start_gateway(
        database_url=url,
        openai_admin_key=fake.organization.admin_key,
        reconcile_days=2,
    )
    with openai.OpenAI(base_url=gateway.base_url, api_key=MASTER_KEY, max_retries=0) as sdk:
        sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])

    def scrape() -> str | None:
        text = httpx.get(gateway.url + "/metrics").text
        return text if "gateway_reconciliation_relative_difference" in text else None

    metrics: str = wait_until(scrape, timeout=10)
    values = dict(re.findall(r'gateway_reconciliation_relative_difference\{measure="(\w+)"\} (\S+)', metrics))
    assert float(values["requests"]) == 0.5
    assert float(values["input_tokens"]) == pytest.approx(0.2)
    assert float(values["output_tokens"]) == 0.0
    openai_cost = _cost(1000, 0, 100)
    assert float(values["cost"]) == pytest.approx(float((openai_cost - _cost(800, 0, 100)) / openai_cost))
    day_start = re.search(r"^gateway_reconciliation_day_timestamp_seconds (\S+)$", metrics, re.M)
    assert day_start is not None and float(day_start[1]) == noon.timestamp() - 12 * 3600
    # A client reaching the organization endpoints through the gateway gets the model key's answer.
    master = {"authorization": f"Bearer {MASTER_KEY}"}
    answer = httpx.get(gateway.base_url + "/organization/costs", params={"start_time": 0}, headers=master)
    assert answer.status_code == 403
    assert fake.requests[-1].headers["authorization"] == f"Bearer {fake.api_key}"
    assert fake.organization.admin_key not in "\n".join(gateway_log)


def test_a_failing_job_logs_without_the_key(
    fake: FakeOpenAI,
    scratch_db: tuple[str, str],
    start_gateway: Callable[..., ThreadedGateway],
    gateway_log: list[str],
) -> None:
    wrong = "sk-admin-not-the-right-one-4321"
    gateway = start_gateway(database_url=scratch_db[1], openai_admin_key=wrong)

    def errors() -> float:
        metrics = httpx.get(gateway.url + "/metrics").text
        found = re.search(r"^gateway_reconciliation_errors_total (\S+)$", metrics, re.M)
        return float(found[1]) if found else 0.0

    wait_until(lambda: errors() >= 1, timeout=10)
    logged = "\n".join(gateway_log)
    assert "reconciliation with OpenAI's usage failed" in logged
    assert "401" in logged
    assert wrong not in logged and "4321" not in logged


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def gateway_log() -> Iterator[list[str]]:
    """The gateway's log lines as written (the gateway replaces the root logger's handlers when it
    starts, so pytest's caplog would see none)."""
    handler, logger = _Lines(), logging.getLogger("gateway")
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)


def test_the_embedded_sqlite_database_reconciles_too(
    fake: FakeOpenAI, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    database = f"sqlite:///{tmp_path / 'gateway.db'}"
    upgrade(database, tmp_path)
    settings = make_settings(database_url=database, openai_admin_key=fake.organization.admin_key)
    today = _today()
    fake.organization.plant(today, MINI, requests=2, input_tokens=30, output_tokens=3)

    async def gateway_call_and_report() -> list[dict[str, Any]]:
        engine = create_engine(database, tmp_path)
        try:
            async with engine.begin() as conn:
                await conn.execute(
                    usage_events.insert(),
                    {
                        "created_at": datetime.now(UTC),
                        "request_id": "req_sqlite",
                        "endpoint": "/v1/chat/completions",
                        "model": "gpt-4o-mini",
                        "upstream_model": MINI,
                        "stream": False,
                        "status_code": 200,
                        "attempts": 1,
                        "prompt_tokens": 10,
                        "completion_tokens": 1,
                        "total_tokens": 11,
                        "usage_source": "upstream",
                        "cost_usd": Decimal("0.0000021"),
                        "latency_ms": 5,
                    },
                )
            return await store.report(engine, today, today + timedelta(days=1))
        finally:
            await engine.dispose()

    _read(settings, today, today + timedelta(days=1))
    (row,) = asyncio.run(gateway_call_and_report())
    assert (row["model"], row["gateway_requests"], row["openai_requests"]) == (MINI, 1, 2)
    assert row["input_tokens_difference"] == 20
    assert row["openai_cost_usd"] == _cost(30, 0, 3)


def test_line_items_name_their_model() -> None:
    assert line_item_model("gpt-4o-mini-2024-07-18, cached input") == MINI
    assert line_item_model("gpt-audio-mini-2025-12-15 audio, input") == "gpt-audio-mini-2025-12-15"
    assert line_item_model("web search tool calls") == "web search tool calls"
    assert line_item_model("evals | gpt-4o-mini-2024-07-18, input") == "evals | gpt-4o-mini-2024-07-18"
    assert line_item_model(None) == ""


def test_relative_difference() -> None:
    assert store.relative(10, 5) == 0.5
    assert store.relative(0, 0) == 0.0
    assert store.relative(0, 3) == float("-inf")


@pytest.mark.parametrize("ids", ["proj a", "proj_x,../y", ",".join(f"p{n}" for n in range(101))])
def test_bad_id_lists_are_refused_at_start(make_settings: Callable[..., Settings], ids: str) -> None:
    with pytest.raises(ValidationError, match="comma-separated ids"):
        make_settings(reconcile_project_ids=ids)
    assert make_settings(reconcile_api_key_ids=" key_a, key_b ,").reconcile_api_key_ids == "key_a,key_b"


def test_the_cli_refuses_a_range_it_would_not_read(fake: FakeOpenAI, scratch_db: tuple[str, str]) -> None:
    result = _cli(fake, scratch_db[1], "--since", "2024-01-01")
    assert result.returncode == 2
    assert "1 to 366 days" in result.stderr
    assert not [r for r in fake.requests if r.path.startswith("/v1/organization/")]
