"""What stops an upstream request that waits for its answer, read from the fake's own request log.

The HTTP client (pyreqwest 0.15) runs each request as a task of its own runtime and, when the await is
cancelled, lets that task run on: the upstream answers, and bills, a request nobody waits for. Only the
request's own timeout, fired inside that task, closes the connection. So the gateway does not cancel a call
whose client has left: it waits for the answer and keeps the billed usage on the row (SECURITY.md, "Known
limits"). When the first test here fails, a cancelled request is aborted at last: a call whose client has
left can then be cancelled rather than waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable

import orjson

from app.call.record import CallRecord
from app.config import Settings
from app.config_file import DEFAULT_UPSTREAM
from app.proxy.targets import UpstreamTarget
from app.proxy.upstream import UpstreamClient, UpstreamUnavailable, never_open
from tests.fakes.openai_upstream import FakeOpenAI, RecordedRequest

PATH = "/chat/completions"
# Long enough to cancel the call while the fake still holds its answer back.
UPSTREAM_THINKS_S = 1.0


def _call_then(fake: FakeOpenAI, settings: Settings, cancel: bool) -> RecordedRequest:
    """Send one chat call read whole; once the fake has it, cancel the await (or let the request's own
    timeout fire); then the fake's record of that request, once it is answered or abandoned."""
    marker = uuid.uuid4().hex

    def ours(record: RecordedRequest) -> bool:
        return record.json is not None and record.json.get("user") == marker

    async def run() -> RecordedRequest:
        upstream = UpstreamClient(settings)
        await upstream.start()
        target = UpstreamTarget(DEFAULT_UPSTREAM, fake.base_url, fake.api_key)
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "user": marker}
        sent = asyncio.create_task(
            upstream.send(
                target,
                "POST",
                PATH,
                body=orjson.dumps(body),
                headers={"content-type": "application/json"},
                call=CallRecord(request_id=marker, method="POST", path="/v1" + PATH),
                keep_open=never_open,
            )
        )
        try:
            await asyncio.to_thread(fake.wait_for, ours)
            if cancel:
                sent.cancel()
            with contextlib.suppress(asyncio.CancelledError, UpstreamUnavailable):
                await sent
            # The loop and the client stay up meanwhile, as in a running gateway.
            return await asyncio.to_thread(
                fake.wait_for,
                lambda r: ours(r) and (r.status is not None or r.disconnected),
                UPSTREAM_THINKS_S + 5,
            )
        finally:
            await upstream.close()

    fake.slow_first_byte(UPSTREAM_THINKS_S)
    return asyncio.run(run())


def test_a_cancelled_request_still_reaches_its_answer(
    fake: FakeOpenAI, make_settings: Callable[..., Settings]
) -> None:
    record = _call_then(fake, make_settings(max_attempts=1), cancel=True)
    assert (record.status, record.disconnected) == (200, False)
    assert record.usage is not None and record.usage["prompt_tokens"] > 0


def test_a_request_whose_timeout_fires_is_closed_upstream(
    fake: FakeOpenAI, make_settings: Callable[..., Settings]
) -> None:
    """The same fake sees a connection closed before its answer: the test above would see an abort."""
    settings = make_settings(max_attempts=1, request_timeout_s=UPSTREAM_THINKS_S / 4)
    record = _call_then(fake, settings, cancel=False)
    assert (record.status, record.disconnected) == (None, True)
