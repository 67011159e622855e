"""No usage event lost or doubled: a database outage under traffic, SIGTERM under traffic, and a
gateway restart that replays what it spooled while the database was away."""

from __future__ import annotations

import signal
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import openai

from tests.db import database_down, database_up, fetch, wait_for_rows
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, GatewayProcess, ThreadedGateway, wait_until

MESSAGES = [{"role": "user", "content": "count me"}]


def call(sdk: openai.OpenAI, request_id: str, stream: bool = False) -> None:
    response = sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=stream,
        extra_headers={"X-Request-Id": request_id, "X-Feature": "durability"},
    )
    if stream:
        list(response)  # type: ignore[call-overload]


def assert_exactly_once(url: str, request_ids: list[str]) -> None:
    rows = wait_for_rows(url, *request_ids, timeout=30)
    assert sorted(row["client_request_id"] for row in rows) == sorted(request_ids)
    (daily,) = fetch(
        url, "SELECT COALESCE(SUM(requests), 0) AS n FROM usage_daily WHERE feature = 'durability'"
    )
    (events,) = fetch(url, "SELECT COUNT(*) AS n FROM usage_events WHERE feature = 'durability'")
    assert daily["n"] == events["n"] == len(request_ids)


def test_database_outage_under_traffic_loses_nothing(
    scratch_db: tuple[str, str], start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI
) -> None:
    name, url = scratch_db
    gateway = start_gateway(database_url=url, recorder_flush_interval_s=0.05)
    recorder = gateway.app.services.meter.recorder
    before = [f"before-{i}" for i in range(10)]
    during = [f"during-{i}" for i in range(30)]
    with openai.OpenAI(base_url=gateway.base_url, api_key=MASTER_KEY, max_retries=0) as sdk:
        for request_id in before:
            call(sdk, request_id)
        wait_for_rows(url, *before)
        database_down(name)
        try:
            # The request path never waits for the database: every call still answers.
            for i, request_id in enumerate(during):
                call(sdk, request_id, stream=i % 2 == 0)
            wait_until(lambda: recorder.spool_events() > 0, timeout=15)
        finally:
            database_up(name)
    assert_exactly_once(url, before + during)
    wait_until(lambda: recorder.spool_events() == 0, timeout=30)


def _traffic(sdk: openai.OpenAI, ids: list[str], answered: list[str], lock: threading.Lock) -> None:
    for i, request_id in enumerate(ids):
        try:
            call(sdk, request_id, stream=i % 2 == 1)
        except openai.APIConnectionError:
            return  # the gateway stopped accepting connections
        with lock:
            answered.append(request_id)


def _run_under_sigterm(gateway: GatewayProcess, slow: FakeOpenAI) -> list[str]:
    answered: list[str] = []
    lock = threading.Lock()
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key=MASTER_KEY, max_retries=0, timeout=30) as sdk:
        threads = [
            threading.Thread(
                target=_traffic,
                args=(sdk, [f"sigterm-{t}-{i}-{uuid.uuid4().hex[:6]}" for i in range(40)], answered, lock),
            )
            for t in range(6)
        ]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(answered) >= 20, timeout=30)
        assert gateway.proc is not None
        gateway.proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=60)
    gateway.proc.wait(timeout=30)
    return answered


def _gateway_process(url: str, slow: FakeOpenAI, data_dir: Path) -> GatewayProcess:
    return GatewayProcess(slow, url, data_dir)


def test_sigterm_under_traffic_loses_nothing(scratch_db: tuple[str, str], tmp_path: Path) -> None:
    _, url = scratch_db
    with FakeOpenAI(inter_token_delay_s=0.01, record_requests=False) as slow:
        gateway = _gateway_process(url, slow, tmp_path).start()
        try:
            answered = _run_under_sigterm(gateway, slow)
        finally:
            gateway.stop()
    assert len(answered) >= 20
    assert_exactly_once(url, answered)


def test_events_spooled_at_shutdown_are_replayed_by_the_next_process(
    scratch_db: tuple[str, str], tmp_path: Path
) -> None:
    name, url = scratch_db
    with FakeOpenAI(inter_token_delay_s=0.01, record_requests=False) as slow:
        gateway = _gateway_process(url, slow, tmp_path).start()
        database_down(name)
        try:
            answered = _run_under_sigterm(gateway, slow)
        finally:
            gateway.stop()
            database_up(name)
        assert list((tmp_path / "spool").iterdir()), "the stopped gateway left no spool"
        restarted = _gateway_process(url, slow, tmp_path).start()
        try:
            assert_exactly_once(url, answered)
        finally:
            restarted.stop()
