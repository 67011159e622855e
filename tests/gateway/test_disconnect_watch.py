"""The watcher that ends a relayed stream when its client leaves: once stopped, it leaves nothing behind for
the cycle collector."""

from __future__ import annotations

import asyncio
import gc

from app.proxy.streaming import DisconnectWatch


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
