"""Batches created through the gateway are metered once they end: one row per request line, attributed
to the creating key, feature and user, priced at the batch rate, exactly once across polls, retrievals,
restarts and replicas. The official SDK is the client; the fake upstream runs the batch."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import signal
import sqlite3
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import orjson
import pytest

from app.batches.meter import BatchMeter, BatchSettings, _Owner, line_event, line_key
from app.db.engine import create_engine
from app.db.migrate import upgrade
from app.live_config import ConfigHolder
from app.metering.pricing import PriceTable
from app.proxy.upstream import UpstreamClient
from tests.conftest import sdk_client
from tests.db import database_down, database_up, fetch
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, GatewayProcess, ThreadedGateway, wait_until
from tests.limits import REDIS_URL

FAST = {"batch_poll_initial_s": 0.05, "batch_poll_max_s": 0.2}
# The poller will not come round within a test: only a client's retrieval can get the batch metered.
NEVER = {"batch_poll_initial_s": 3600.0, "batch_poll_max_s": 3600.0}


def _input(*models: str) -> bytes:
    lines = [
        {
            "custom_id": f"req-{index}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": model,
                "messages": [{"role": "user", "content": f"Question {index} " * (index + 1)}],
            },
        }
        for index, model in enumerate(models)
    ]
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def _make_key(gateway: ThreadedGateway, feature: str) -> str:
    return _make_key_at(gateway.url, feature)


def _make_key_at(url: str, feature: str) -> str:
    body = {"name": f"batch-{uuid.uuid4().hex[:6]}", "scopes": ["*"], "default_feature": feature}
    answer = httpx.post(
        url + "/admin/keys", json=body, headers={"authorization": f"Bearer {MASTER_KEY}"}, timeout=10
    )
    assert answer.status_code == 201, answer.text
    secret: str = answer.json()["secret"]
    return secret


def _create(client: openai.OpenAI, content: bytes, user: str) -> str:
    headers = {"X-User-Id": user}
    uploaded = client.files.create(file=("in.jsonl", content), purpose="batch", extra_headers=headers)
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_headers=headers,
    )
    assert batch.status == "validating"
    return batch.id


def _rows(url: str, batch_id: str) -> list[dict[str, Any]]:
    return fetch(
        url, "SELECT * FROM usage_events WHERE request_id LIKE $1 ORDER BY request_id", batch_id + ":%"
    )


def _metered(url: str, batch_id: str) -> dict[str, Any] | None:
    """The batch's batch_jobs row once it has been metered (the row itself is written in the background)."""
    rows = fetch(url, "SELECT * FROM batch_jobs WHERE batch_id = $1 AND metered_at IS NOT NULL", batch_id)
    return rows[0] if rows else None


def _output_lines(client: openai.OpenAI, file_id: str | None) -> dict[str, dict[str, Any]]:
    if file_id is None:
        return {}
    content = client.files.content(file_id).read()
    return {line["custom_id"]: line for line in map(orjson.loads, content.splitlines())}


def _daily_requests(url: str, feature: str) -> int:
    rows = fetch(url, "SELECT coalesce(sum(requests), 0) AS n FROM usage_daily WHERE feature = $1", feature)
    return int(rows[0]["n"])


@pytest.fixture
def quick_batches(fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> FakeOpenAI:
    monkeypatch.setattr(fake, "job_delay_s", 0.3)
    return fake


def test_a_batch_is_metered_by_the_poller_once_per_line(
    quick_batches: FakeOpenAI,
    start_gateway: Callable[..., ThreadedGateway],
    database_url: str,
) -> None:
    gateway = start_gateway(**FAST)
    feature = f"nightly-{uuid.uuid4().hex[:6]}"
    with sdk_client(gateway.base_url, api_key=_make_key(gateway, feature)) as client:
        batch_id = _create(client, _input("gpt-4o-mini", "gpt-5-mini", "fail-model"), user="u-batch")
        # Nobody retrieves the batch: the poller finds it has ended.
        rows = wait_until(lambda: len(_rows(database_url, batch_id)) == 3 and _rows(database_url, batch_id))
        batch = client.batches.retrieve(batch_id)
        answered = _output_lines(client, batch.output_file_id)
        failed = _output_lines(client, batch.error_file_id)
    assert batch.status == "completed"
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 1)
    assert set(answered) == {"req-0", "req-1"} and set(failed) == {"req-2"}
    by_id = {row["request_id"]: row for row in rows}
    assert set(by_id) == {f"{batch_id}:req-0", f"{batch_id}:req-1", f"{batch_id}:req-2"}
    prices = PriceTable()
    for custom_id, line in answered.items():
        row = by_id[f"{batch_id}:{custom_id}"]
        body = line["response"]["body"]
        usage = body["usage"]
        assert (row["prompt_tokens"], row["completion_tokens"]) == (
            usage["prompt_tokens"],
            usage["completion_tokens"],
        )
        assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
        assert (row["endpoint"], row["status_code"], row["model"]) == ("/v1/batches", 200, body["model"])
        assert (row["feature"], row["user_id"]) == (feature, "u-batch")
        assert row["api_key_id"] is not None
        assert row["service_tier"] == "batch"
        standard = prices.price(
            body["model"], "standard", usage["prompt_tokens"], usage["completion_tokens"]
        ).cost_units
        assert standard is not None and row["cost_usd"] == Decimal(standard) / 2 / Decimal(10) ** 10
        assert row["price_key"].endswith("@batch")
    error_row = by_id[f"{batch_id}:req-2"]
    assert (error_row["status_code"], error_row["error_type"], error_row["prompt_tokens"]) == (
        404,
        "model_not_found",
        0,
    )
    job = wait_until(lambda: _metered(database_url, batch_id))
    assert (job["status"], job["metered_lines"], job["truncated"]) == ("completed", 3, False)
    assert (job["feature"], job["user_id"]) == (feature, "u-batch")
    assert _daily_requests(database_url, feature) == 3
    scrape = httpx.get(gateway.url + "/metrics", timeout=5).text
    assert "gateway_batch_lines_metered_total 3.0" in scrape
    assert "gateway_batches_pending 0.0" in scrape


def test_retrieval_meters_it_and_nothing_counts_twice(
    quick_batches: FakeOpenAI,
    start_gateway: Callable[..., ThreadedGateway],
    database_url: str,
) -> None:
    gateway = start_gateway(**NEVER)
    replica = start_gateway(**FAST)
    feature = f"adhoc-{uuid.uuid4().hex[:6]}"
    with sdk_client(gateway.base_url, api_key=_make_key(gateway, feature)) as client:
        batch_id = _create(client, _input("gpt-4o-mini", "gpt-4o-mini"), user="u-2")
        wait_until(lambda: client.batches.retrieve(batch_id).status == "completed", timeout=10)
        rows = wait_until(lambda: len(_rows(database_url, batch_id)) == 2 and _rows(database_url, batch_id))
        # Retrieved again and again, here and through a replica polling the same database.
        for _ in range(3):
            client.batches.retrieve(batch_id)
    with sdk_client(replica.base_url, api_key=MASTER_KEY) as master:
        master.batches.retrieve(batch_id)
    wait_until(lambda: _metered(database_url, batch_id))
    assert len(_rows(database_url, batch_id)) == 2
    assert _daily_requests(database_url, feature) == 2
    assert {row["user_id"] for row in rows} == {"u-2"}


def test_a_restarted_gateway_meters_what_the_last_one_created(
    fake: FakeOpenAI,
    start_gateway: Callable[..., ThreadedGateway],
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Long enough for the first gateway to be gone well before the batch ends.
    monkeypatch.setattr(fake, "job_delay_s", 2.0)
    first = start_gateway(**FAST)
    with sdk_client(first.base_url) as client:
        batch_id = _create(client, _input("gpt-4o-mini"), user="u-3")
    wait_until(lambda: fetch(database_url, "SELECT 1 FROM batch_jobs WHERE batch_id = $1", batch_id))
    first.stop()
    assert _rows(database_url, batch_id) == []
    # Its successor finds the batch in the database and polls it to its end.
    start_gateway(**FAST)
    (row,) = wait_until(lambda: _rows(database_url, batch_id))
    assert (row["request_id"], row["user_id"], row["feature"]) == (f"{batch_id}:req-0", "u-3", None)


def test_the_output_read_is_bounded(
    quick_batches: FakeOpenAI,
    start_gateway: Callable[..., ThreadedGateway],
    database_url: str,
) -> None:
    gateway = start_gateway(batch_max_file_bytes=2048, **FAST)
    with sdk_client(gateway.base_url) as client:
        batch_id = _create(client, _input(*["gpt-4o-mini"] * 20), user="u-4")
        job = wait_until(lambda: _metered(database_url, batch_id))
        output = client.files.content(client.batches.retrieve(batch_id).output_file_id or "").read()
    assert len(output) > 4 * 2048
    assert job["truncated"] is True
    assert 0 < job["metered_lines"] < 20
    assert len(_rows(database_url, batch_id)) == job["metered_lines"]


def test_a_failed_batch_is_metered_with_no_rows(
    quick_batches: FakeOpenAI,
    start_gateway: Callable[..., ThreadedGateway],
    database_url: str,
) -> None:
    gateway = start_gateway(**FAST)
    with sdk_client(gateway.base_url) as client:
        uploaded = client.files.create(file=("empty.jsonl", b"\n"), purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        job = wait_until(lambda: _metered(database_url, batch.id))
        assert client.batches.retrieve(batch.id).status == "failed"
    assert (job["status"], job["metered_lines"]) == ("failed", 0)
    assert _rows(database_url, batch.id) == []


def test_creating_a_batch_does_not_wait_for_the_database(
    quick_batches: FakeOpenAI,
    start_gateway: Callable[..., ThreadedGateway],
    scratch_db: tuple[str, str],
) -> None:
    name, url = scratch_db
    gateway = start_gateway(database_url=url, **FAST)
    database_down(name)
    try:
        with sdk_client(gateway.base_url, timeout=5) as client:
            batch_id = _create(client, _input("gpt-4o-mini"), user="u-5")
    finally:
        database_up(name)
    # Kept in memory while the database was away, written and metered once it is back.
    (row,) = wait_until(lambda: _rows(url, batch_id))
    assert (row["request_id"], row["user_id"]) == (f"{batch_id}:req-0", "u-5")


@pytest.mark.parametrize(
    "custom_id",
    ["x" * 257, "a\x00b", "line\nbreak", 42, None, ["a"]],
)
def test_hostile_custom_ids_make_bounded_printable_keys(custom_id: object) -> None:
    key = line_key("batch_abc", custom_id)
    assert key.startswith("batch_abc:#") and len(key) == len("batch_abc:#") + 32
    assert key.isprintable()
    assert line_key("batch_abc", custom_id) == key
    assert line_key("batch_abc", "req-1") == "batch_abc:req-1"


@pytest.mark.parametrize(
    "line",
    [
        {"custom_id": "a", "response": None, "error": {"code": "batch_expired", "message": "expired"}},
        {"custom_id": "a", "response": {"status_code": "200", "body": "not an object"}},
        {"custom_id": "a", "response": {"status_code": 200, "body": {"model": "m\x00", "usage": [1]}}},
        {"custom_id": "a", "response": {"status_code": 10**12, "body": {"usage": {"prompt_tokens": -5}}}},
    ],
)
def test_malformed_lines_become_rows_without_tokens(line: dict[str, Any]) -> None:
    owner = _Owner("key_1", "f", "u")
    event = line_event("batch_abc", line, owner, datetime.now(UTC), PriceTable())
    assert event is not None
    assert (event.prompt_tokens, event.completion_tokens, event.cost_units) == (0, 0, None)
    assert event.model is None and event.status_code in (0, 200)
    assert line_event("batch_abc", {"id": "no custom id"}, owner, datetime.now(UTC), PriceTable()) is None


def test_a_batch_the_upstream_forgot_is_no_longer_polled(
    fake: FakeOpenAI,
    start_gateway: Callable[..., ThreadedGateway],
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fake, "job_delay_s", 60.0)
    gateway = start_gateway(**FAST)
    with sdk_client(gateway.base_url) as client:
        batch_id = _create(client, _input("gpt-4o-mini"), user="u-6")
    with fake.store.lock:
        del fake.store.batches[batch_id]
    job = wait_until(lambda: _metered(database_url, batch_id))
    assert (job["status"], job["metered_lines"]) == ("not_found", 0)
    assert _rows(database_url, batch_id) == []


def test_a_batch_created_at_another_upstream_is_left_for_a_gateway_that_sends_there(
    quick_batches: FakeOpenAI,
    start_gateway: Callable[..., ThreadedGateway],
    database_url: str,
) -> None:
    # A batch some other deployment sharing the database created at its own upstream, due for a poll.
    foreign = f"batch_elsewhere_{uuid.uuid4().hex[:8]}"
    fetch(
        database_url,
        "INSERT INTO batch_jobs (batch_id, created_at, status, next_poll_at, upstream)"
        " VALUES ($1, now(), 'in_progress', now(), 'http://127.0.0.1:9/v1')",
        foreign,
    )
    gateway = start_gateway(**FAST)
    with sdk_client(gateway.base_url) as client:
        batch_id = _create(client, _input("gpt-4o-mini"), user="u-7")
    # This gateway's poller has run its rounds: its own batch is metered...
    wait_until(lambda: _metered(database_url, batch_id))
    # ...and the other upstream's was neither asked about here nor closed.
    assert not [r for r in quick_batches.requests if r.path.endswith(foreign)]
    job = fetch(database_url, "SELECT * FROM batch_jobs WHERE batch_id = $1", foreign)[0]
    assert (job["metered_at"], job["status"], job["polls"]) == (None, "in_progress", 0)
    mine = fetch(database_url, "SELECT upstream FROM batch_jobs WHERE batch_id = $1", batch_id)[0]
    assert mine["upstream"] == quick_batches.base_url


def test_a_line_the_database_refuses_is_left_out_alone(database_url: str) -> None:
    async def run() -> int:
        engine = create_engine(database_url, Path("unused"))
        meter = BatchMeter(
            engine,
            cast(UpstreamClient, None),
            cast(ConfigHolder, None),
            BatchSettings(poll_initial_s=1, poll_max_s=1, lease_s=1, max_file_bytes=1024),
        )
        owner = _Owner(None, "refused", None)
        now = datetime.now(UTC)
        usage = {"prompt_tokens": 1, "completion_tokens": 1}
        lines = [
            {
                "custom_id": "a",
                "response": {"status_code": 200, "body": {"model": "gpt-4o-mini", "usage": usage}},
            },
            # More tokens than a bigint holds: the database refuses this row, and only this one.
            {
                "custom_id": "b",
                "response": {"status_code": 200, "body": {"usage": {"prompt_tokens": 10**20}}},
            },
            {
                "custom_id": "c",
                "response": {"status_code": 200, "body": {"model": "gpt-4o-mini", "usage": usage}},
            },
        ]
        events = [line_event(batch_id, line, owner, now, PriceTable()) for line in lines]
        try:
            return await meter._write([event for event in events if event is not None])
        finally:
            await engine.dispose()

    batch_id = f"batch_{uuid.uuid4().hex}"
    assert asyncio.run(run()) == 2
    assert [row["request_id"] for row in _rows(database_url, batch_id)] == [f"{batch_id}:a", f"{batch_id}:c"]


def test_batches_are_metered_on_the_embedded_sqlite_too(
    quick_batches: FakeOpenAI,
    start_gateway: Callable[..., ThreadedGateway],
    tmp_path: Path,
) -> None:
    upgrade(None, tmp_path)
    gateway = start_gateway(database_url="", data_dir=tmp_path, **FAST)

    def rows() -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(tmp_path / "gateway.db")) as db:
            return db.execute(
                "SELECT request_id, endpoint, service_tier, cost_usd FROM usage_events"
                " WHERE endpoint = '/v1/batches' ORDER BY request_id"
            ).fetchall()

    with sdk_client(gateway.base_url) as client:
        batch_id = _create(client, _input("gpt-4o-mini", "gpt-4o-mini"), user="u-7")
        found = wait_until(lambda: len(rows()) == 2 and rows())
    assert [row[0] for row in found] == [f"{batch_id}:req-0", f"{batch_id}:req-1"]
    assert all(row[1:3] == ("/v1/batches", "batch") and row[3] > 0 for row in found)


def test_a_metered_batch_counts_against_its_owners_budgets_once(
    quick_batches: FakeOpenAI,
    start_gateway: Callable[..., ThreadedGateway],
    database_url: str,
) -> None:
    # Two gateways sharing Redis: whichever meters the batch, both see its spend.
    gateway = start_gateway(redis_url=REDIS_URL, **FAST)
    replica = start_gateway(redis_url=REDIS_URL, **FAST)
    body = {"name": f"batch-{uuid.uuid4().hex[:6]}", "scopes": ["*"], "budget_daily_usd": "5"}
    created = httpx.post(
        gateway.url + "/admin/keys", json=body, headers={"authorization": f"Bearer {MASTER_KEY}"}, timeout=10
    ).json()
    with sdk_client(gateway.base_url, api_key=created["secret"]) as client:
        batch_id = _create(client, _input("gpt-4o-mini", "gpt-5-mini"), user="u-8")
        wait_until(lambda: _metered(database_url, batch_id))
        # Retrieved through both gateways after it was metered: nothing is charged again.
        client.batches.retrieve(batch_id)
    with sdk_client(replica.base_url, api_key=MASTER_KEY) as master:
        master.batches.retrieve(batch_id)
    cost = sum((Decimal(str(row["cost_usd"])) for row in _rows(database_url, batch_id)), Decimal(0))
    assert cost > 0

    def spent() -> Decimal:
        budgets = httpx.get(
            gateway.url + "/admin/budgets", headers={"authorization": f"Bearer {MASTER_KEY}"}, timeout=5
        ).json()["data"]
        row = next(r for r in budgets if r["scope"] == f"key:{created['id']}" and r["period"] == "day")
        return Decimal(row["spent_usd"])

    wait_until(lambda: spent() == cost)


def test_a_batch_whose_gateway_was_killed_before_tracking_it_is_still_metered(
    fake: FakeOpenAI, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fake, "job_delay_s", 0.3)
    env = {"GATEWAY_BATCH_POLL_INITIAL_S": "0.05", "GATEWAY_BATCH_POLL_MAX_S": "0.2"}
    first = GatewayProcess(fake, database_url, tmp_path, env=env).start(wait=False)
    feature = f"killed-{uuid.uuid4().hex[:6]}"
    try:
        wait_until(first.ready, timeout=90)
        with sdk_client(first.url + "/v1", api_key=_make_key_at(first.url, feature), max_retries=0) as client:
            uploaded = client.files.create(file=("in.jsonl", _input("gpt-4o-mini")), purpose="batch")
            # The upstream creates the batch and holds its answer: the gateway is killed while it waits,
            # after the batch exists and before anything about it reached the database.
            fake.batch_answers.clear()
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                creating = pool.submit(
                    client.batches.create,
                    input_file_id=uploaded.id,
                    endpoint="/v1/chat/completions",
                    completion_window="24h",
                    extra_headers={"X-User-Id": "u-killed"},
                )
                batch_id = wait_until(
                    lambda: next(
                        (b.id for b in list(fake.store.batches.values()) if b.input_file_id == uploaded.id),
                        None,
                    )
                )
                assert first.proc is not None
                first.proc.send_signal(signal.SIGKILL)
                first.proc.wait()
                with pytest.raises(openai.APIConnectionError):
                    creating.result()
    finally:
        fake.batch_answers.set()
        first.stop()
    assert fetch(database_url, "SELECT 1 FROM batch_jobs WHERE batch_id = $1", batch_id) == []
    assert list((tmp_path / "batch-intents").glob("*.json"))
    # Its successor finds what the dead process meant to create, and meters it for the same owner.
    second = GatewayProcess(fake, database_url, tmp_path, env=env).start(wait=False)
    try:
        wait_until(second.ready, timeout=90)
        job = wait_until(lambda: _metered(database_url, batch_id), timeout=20)
        (row,) = _rows(database_url, batch_id)
    finally:
        second.stop()
    assert (job["feature"], job["user_id"]) == (feature, "u-killed")
    assert (row["request_id"], row["feature"], row["user_id"]) == (f"{batch_id}:req-0", feature, "u-killed")
    assert list((tmp_path / "batch-intents").glob("*.json")) == []


def test_a_refused_batch_leaves_no_intent(
    quick_batches: FakeOpenAI, start_gateway: Callable[..., ThreadedGateway], tmp_path: Path
) -> None:
    gateway = start_gateway(data_dir=tmp_path, **FAST)
    with sdk_client(gateway.base_url) as client, pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id="file-none", endpoint="/v1/nowhere", completion_window="24h")
    assert list((tmp_path / "batch-intents").glob("*.json")) == []
