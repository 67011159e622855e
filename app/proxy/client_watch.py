"""Noticing a client that leaves while its call waits for the upstream's answer.

A call answered whole (or a stream before its first bytes) waits inside its handler, and only ASGI's
`receive` tells that the client has gone: some task must be waiting on it. A task of its own for every call
cost ~5 µs a call (creating, starting and cancelling it), a tenth of the gateway's own work on a call, for
the few clients that leave. So a call is only registered as waiting (two dict operations), and a sweep
every AFTER_S starts a watcher for each call that has been waiting since the sweep before: a client that
leaves is noticed within 2 x AFTER_S, and a call answered sooner never gets a watcher at all.

The watcher marks the call (`client_disconnected`, `error_type`); it does not cancel it. The upstream client
(pyreqwest 0.15.1) cannot abort a request still waiting for its answer's head (or a stream's first bytes,
which pyreqwest reads in the same task): cancelling the await detaches the request, which runs on — and is
billed — until the upstream answers (tests/security/test_upstream_abort.py). So the call waits for
that answer too, and its row carries the tokens the upstream billed rather than a guess; the relay then
answers nobody (499) and closes a stream at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import Receive

from app.call.record import CallRecord

AFTER_S = 0.25


class ClientWatch:
    """One per app. Used from the event loop's thread only. A call is known by its request's `receive`,
    one per request (its task would do as well, but asking asyncio for it costs a system call)."""

    def __init__(self) -> None:
        # Calls registered since the last sweep, and those registered before it.
        self._young: dict[Receive, CallRecord] = {}
        self._old: dict[Receive, CallRecord] = {}
        self._watchers: dict[Receive, asyncio.Task[Any]] = {}
        self._sweep_timer: asyncio.TimerHandle | None = None

    def enter(self, receive: Receive, call: CallRecord) -> None:
        """The call waits for the upstream from now on: `call` is marked if its client leaves."""
        self._young[receive] = call
        if self._sweep_timer is None:
            self._sweep_timer = asyncio.get_running_loop().call_later(AFTER_S, self._sweep)

    def leave(self, receive: Receive) -> None:
        if self._young.pop(receive, None) is not None or self._old.pop(receive, None) is not None:
            return
        watcher = self._watchers.pop(receive, None)
        if watcher is not None:
            watcher.cancel()

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        for receive, call in self._old.items():
            self._watchers[receive] = loop.create_task(self._watch(receive, call))
        self._old, self._young = self._young, {}
        self._sweep_timer = loop.call_later(AFTER_S, self._sweep) if self._old else None

    @staticmethod
    async def _watch(receive: Receive, call: CallRecord) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        call.outcome.client_disconnected = True
        call.outcome.error_type = "client_disconnected"
