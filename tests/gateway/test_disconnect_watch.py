"""The watcher that ends a relayed stream when its client leaves: once stopped, it leaves nothing behind for
the cycle collector, and the answer's own end is not its client leaving."""

from __future__ import annotations

import asyncio
import gc
import json
import logging

import orjson
import pytest

from app.logs import JsonFormatter
from app.proxy.streaming import DisconnectWatch
from tests.conftest import sdk_client
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import ThreadedGateway, wait_until


async def test_a_stopped_watch_leaves_no_reference_cycle() -> None:
    """A stream's watcher task is cancelled when the stream ends, and a cancelled task keeps its
    CancelledError, whose traceback holds the watcher's frame. Were the watch to keep hold of that task,
    every stream would leave its request in a reference cycle: with 1,000 streams open, the collections
    that freed them stalled every stream for 60-90 ms (docs/performance-log.md)."""
    client_stays = asyncio.Event()

    async def receive() -> dict[str, str]:
        await client_stays.wait()
        return {"type": "http.disconnect"}

    async def relay() -> None:
        watch = DisconnectWatch()
        watch.arm(receive)
        watch.start()
        await asyncio.sleep(0)  # the watcher is now waiting for the client
        watch.stop()

    for _ in range(5):
        await asyncio.create_task(relay())
    # The cancelled watchers finish on the loop's next turns.
    for _ in range(100):
        if asyncio.all_tasks() == {asyncio.current_task()}:
            break
        await asyncio.sleep(0)
    assert asyncio.all_tasks() == {asyncio.current_task()}
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        left_in_cycles = [o for o in gc.garbage if isinstance(o, DisconnectWatch | asyncio.Task)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left_in_cycles == []


def _event(chunk: dict[str, object]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def test_a_stream_whose_upstream_ends_after_done_was_not_abandoned(
    gateway: ThreadedGateway, fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn answers `receive()` with `http.disconnect` once the response is complete, too. The relay's
    last send woke the waiting watcher, which took that for the client's leaving while the relay read the
    upstream's end (its chunked terminator, here half a second after [DONE]): the relay was cancelled,
    the access line said the client had gone, and the upstream's connection was closed instead of going
    back to the pool. 2% of the benchmark's live streams."""
    caplog.set_level(logging.INFO, logger="gateway")
    head = {"id": "chatcmpl-end", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o"}
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    fake.stream_raw(
        _event({**head, "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}),
        _event({**head, "choices": [], "usage": usage}),
        b"data: [DONE]\n\n",
        # The watcher starts once the relay first waits for the upstream: after the first event.
        gap_s=0.2,
        end_delay_s=0.5,
    )
    with sdk_client(gateway.base_url, timeout=15) as sdk:
        stream = sdk.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers={"X-Request-Id": "ends-after-done"},
        )
        words = [choice.delta.content for chunk in stream for choice in chunk.choices]
    assert words == ["Hi"]
    wait_until(lambda: any(record.name == "gateway.access" for record in caplog.records))
    (line,) = [JsonFormatter().format(r) for r in caplog.records if r.name == "gateway.access"]
    entry = json.loads(line)
    assert entry["request_id"] == "ends-after-done"
    assert (entry["status"], entry["client_disconnected"], entry["error_type"]) == (200, False, None)
    # The upstream's answer was read to its end, not cut off.
    record = fake.wait_for(lambda request: request.status == 200)
    assert not record.disconnected
