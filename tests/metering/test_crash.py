"""A crash loses at most the last moment: `llm-gateway serve` killed with SIGKILL two flush intervals after
its last response loses no usage event, with the database up, refusing connections, or not answering at
all; the next process replays what the dead one spooled."""

from __future__ import annotations

import concurrent.futures
import time
import uuid
from pathlib import Path

import openai
import pytest

from tests.db import HangingProxy, database_down, database_up
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, GatewayProcess
from tests.metering.test_durability import assert_exactly_once, call

FLUSH_S = 0.2
CALLS = 200


@pytest.mark.parametrize("database", ["up", "refusing", "hung"])
def test_sigkill_two_flush_intervals_after_the_last_response_loses_nothing(
    database: str, scratch_db: tuple[str, str], tmp_path: Path
) -> None:
    name, url = scratch_db
    ids = [f"crash-{i}-{uuid.uuid4().hex[:8]}" for i in range(CALLS)]
    env = {"GATEWAY_RECORDER_FLUSH_INTERVAL_S": str(FLUSH_S)}
    with FakeOpenAI(record_requests=False) as fake, HangingProxy(url) as proxy:
        gateway = GatewayProcess(fake, proxy.url, tmp_path, env=env).start()
        assert gateway.proc is not None
        try:
            if database == "refusing":
                database_down(name)
            elif database == "hung":
                proxy.hang()
            with (
                openai.OpenAI(base_url=gateway.url + "/v1", api_key=MASTER_KEY, max_retries=0) as sdk,
                concurrent.futures.ThreadPoolExecutor(8) as pool,
            ):
                list(pool.map(lambda i: call(sdk, ids[i], stream=i % 2 == 1), range(CALLS)))
            # The scenario itself, not a wait for a condition: the kill comes this long after the last
            # response, whatever the recorder is doing by then.
            time.sleep(2 * FLUSH_S)
            gateway.proc.kill()
            gateway.proc.wait(timeout=10)
        finally:
            gateway.stop()
            database_up(name)
        restarted = GatewayProcess(fake, url, tmp_path).start()
        try:
            assert_exactly_once(url, ids)
        finally:
            restarted.stop()
