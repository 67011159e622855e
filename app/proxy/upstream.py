"""The one upstream HTTP client per process, and the retrying call through it.

pyreqwest (Rust's reqwest and hyper, awaited from the event loop) rather than aiohttp or httpx: the
upstream client decides a Python gateway's throughput. Measured on this 2-core machine kind, a bare
pass-through on one core relaying nginx's canned answers did ~10,000 JSON requests/s and ~10,300
streams/s with aiohttp, ~16,000 and ~17,700 with pyreqwest (docs/performance-log.md, "The upstream
client"); with httpx ~350 req/s. The gateway relays bytes, so it needs no SDK models here.

Deliberate divergences from a browser-like client: redirects are never followed (a 3xx other than 304 is
refused with a 502), since following one re-sends the prompt, and the upstream key, to a host nobody
configured; and an answer read whole is bounded (GATEWAY_MAX_ANSWER_BYTES), since the upstream is not
trusted to be small.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from pyreqwest.bytes import Bytes
from pyreqwest.client import Client, ClientBuilder
from pyreqwest.exceptions import PyreqwestError
from pyreqwest.http import Url
from pyreqwest.request import StreamRequest
from pyreqwest.response import Response, ResponseBodyReader

from app.call.record import CallRecord
from app.config import Settings
from app.config_file import DEFAULT_UPSTREAM
from app.proxy.retry_policy import RetryPolicy, UpstreamClosedEarly, is_retryable_status
from app.proxy.targets import UpstreamTarget
from app.proxy.upstream_auth import with_api_version

if TYPE_CHECKING:
    from app.tracing import Tracing

log = logging.getLogger("gateway.upstream")

# Headers of the client's request that never go upstream: the client's gateway key, an `api-key` (Azure
# OpenAI's key header: an upstream's key is the gateway's to send, never the client's), the gateway's
# own attribution headers, hop-by-hop headers (RFC 9110 §7.6.1, with Proxy-Authorization, meant for a
# proxy, and those Connection names), identity headers that belong to the client's OpenAI account rather
# than the gateway's key, and Content-Encoding: the gateway decodes a compressed body (app/proxy/body.py).
_DROP_REQUEST = frozenset(
    {
        "authorization",
        "api-key",
        "proxy-authorization",
        "host",
        "content-length",
        "content-encoding",
        "connection",
        "proxy-connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "cookie",
        "accept-encoding",
        "x-feature",
        "x-user-id",
        "x-request-id",
        "openai-organization",
        "openai-project",
    }
)
# Upstream response headers a client's SDK reads; everything else (cookies, CDN headers, framing)
# stays here. The upstream's x-request-id is renamed: ours is the one the client sees.
_RELAY_RESPONSE = frozenset(
    {
        "retry-after",
        "retry-after-ms",
        "openai-processing-ms",
        "openai-version",
        "openai-model",
        "openai-poll-after-ms",
    }
)


# Parsed URLs an upstream client keeps, and the longest it keeps: what a client's paths and queries can make
# it hold stays under a megabyte.
_MAX_URLS = 256
_MAX_URL_CHARS = 1024


class UpstreamUnavailable(Exception):
    """No usable answer: `timeout` (→ 504); `connect` (no answer after every attempt), `redirect` or
    `answer_too_large` (→ 502)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Whereabouts:
    """What an operator reading an upstream failure needs: the host, and the settings that point there.
    The host and port only: a base URL's path or user info may hold what callers should not see."""

    host: str
    url_setting: str
    key_setting: str
    key_set: bool


def whereabouts(target: UpstreamTarget) -> Whereabouts:
    parts = urlsplit(target.base_url)
    host = parts.hostname or "the upstream"
    if parts.port:
        host = f"{host}:{parts.port}"
    if target.name == DEFAULT_UPSTREAM and not target.configured:
        return Whereabouts(host, "OPENAI_BASE_URL", "OPENAI_API_KEY", target.api_key is not None)
    config = f"upstream '{target.name}' in GATEWAY_CONFIG"
    return Whereabouts(
        host, f"the base_url of {config}", f"the api_key_env of {config}", target.api_key is not None
    )


def unreachable(target: UpstreamTarget, attempts: int, exc: BaseException) -> str:
    """A call that got no answer, said so that whoever started the gateway can act on it."""
    where = whereabouts(target)
    message = (
        f"upstream unreachable: no answer from {where.host} after {attempts} attempt(s) "
        f"({type(exc).__name__}). Check {where.url_setting} and that the gateway's network reaches that host"
    )
    if not where.key_set:
        message += f"; {where.key_setting} is not set either"
    return message + "."


class ResponseHead(Protocol):
    """What `keep_open` decides on: the answer's status and headers, before its body."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...


class UpstreamStream:
    """An answer whose body is still arriving."""

    __slots__ = ("_left", "_reader", "_request", "read_chunk")

    def __init__(
        self, request: StreamRequest, reader: ResponseBodyReader, headers: Mapping[str, str], first: int
    ) -> None:
        self._request = request
        self._reader = reader
        # A length-delimited body is over once its declared length came (RFC 9112 §6.3), and hyper then
        # gives the connection back to the pool without reading on: asking pyreqwest for the end would
        # cost a round trip to its I/O thread, ~6 us of a short stream's CPU, to learn nothing. -1: a
        # chunked body, whose end only a read tells.
        declared = headers.get("content-length")
        self._left = int(declared) - first if declared is not None and declared.isdigit() else -1
        # The next bytes as pyreqwest hands them over (`bytes()` makes them bytes); None at the end. For
        # a chunked body, a stream's, pyreqwest's own awaitable: the SSE relay reads each event through
        # it, a coroutine less an event.
        self.read_chunk: Callable[[], Awaitable[Bytes | None]] = (
            reader.read_chunk if self._left < 0 else self._read_counted
        )

    async def read(self) -> bytes | None:
        """The next bytes as they arrive; None at the end of the body."""
        chunk = await self.read_chunk()
        return None if chunk is None else bytes(chunk)

    async def _read_counted(self) -> Bytes | None:
        if self._left == 0:
            return None
        chunk = await self._reader.read_chunk()
        if chunk is not None:
            self._left -= len(chunk)
        return chunk

    def close(self) -> Awaitable[object]:
        """Read to its end, the connection goes back to the pool; otherwise it is closed, so the upstream
        stops sending (and, for a model, generating). pyreqwest's own awaitable: a frame less."""
        return self._request.__aexit__(None, None, None)


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    headers: Mapping[str, str]
    # The whole body, or for an open stream the first bytes (read inside the attempt, so a failure
    # before them is retried while nothing has reached the client yet).
    body: bytes
    stream: UpstreamStream | None = None


def upstream_request_headers(client_headers: Mapping[str, str]) -> dict[str, str]:
    connection = client_headers.get("connection")
    # The headers a client's Connection names are hop-by-hop too (RFC 9110 §7.6.1).
    listed = () if connection is None else [option.strip().lower() for option in connection.split(",")]
    return {
        name: value
        for name, value in client_headers.items()
        if name not in _DROP_REQUEST and not name.startswith("x-gateway-") and name not in listed
    }


def is_sse(response: ResponseHead) -> bool:
    return response.status < 300 and response.headers.get("content-type", "").startswith("text/event-stream")


def never_open(_: ResponseHead) -> bool:
    """For calls answered with one JSON body: read whole, under the total request timeout."""
    return False


def is_redirect(status: int) -> bool:
    # 304 Not Modified answers a conditional GET (a passthrough download); it points nowhere.
    return 300 <= status < 400 and status != 304


async def read_whole(reader: ResponseBodyReader, headers: Mapping[str, str], limit: int) -> bytes:
    """The body, or UpstreamUnavailable once it passes `limit` bytes (counted decoded: reqwest undoes a
    Content-Encoding, dropping Content-Length, before the gateway sees a byte)."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit():
        if int(declared) > limit:
            raise _too_large(limit)
        # A length-delimited body ends at its declared length (RFC 9112 §6.3): hyper reads no further.
        return bytes(await reader.bytes())
    chunks: list[bytes] = []
    size = 0
    while (chunk := await reader.read_chunk()) is not None:
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(bytes(chunk))
    return b"".join(chunks)


def _too_large(limit: int) -> UpstreamUnavailable:
    return UpstreamUnavailable("answer_too_large", f"upstream answer larger than the gateway's {limit} bytes")


def relay_response_headers(upstream: Mapping[str, str]) -> dict[str, str]:
    """`upstream`'s names are lower-case, as pyreqwest (the http crate) gives them. Names first, values
    only of the few relayed: each one pyreqwest hands over is a new Python string, and OpenAI answers with
    ~20 headers (5.3 -> 3.8 us a call for those, measured)."""
    headers: dict[str, str] = {}
    for name in upstream:
        if name in _RELAY_RESPONSE or name.startswith("x-ratelimit-"):
            headers[name] = upstream[name]
        elif name == "x-request-id":
            headers["x-upstream-request-id"] = upstream[name]
    return headers


def io_threads_yield_to_the_loop() -> None:
    """Schedule pyreqwest's I/O thread as SCHED_BATCH.

    reqwest does the socket work on a thread of its own, woken by every upstream socket that becomes
    ready. Scheduled normally, that thread preempts the event loop's thread at once whenever the two
    share a core, runs for a few microseconds, then waits for the GIL the loop holds: under load, ~2.7
    context switches a request, and the I/O thread took a quarter of the process's CPU. A SCHED_BATCH
    thread does not preempt on wakeup: it runs when the loop waits for events or its time slice ends,
    then handles every socket that became ready meanwhile (0.09 switches a request; one worker did ~30%
    more requests/s, docs/performance-log.md). With a core to itself it runs at once, as before. Linux only;
    unprivileged; where refused (a seccomp profile), the thread stays as it was."""
    if not hasattr(os, "sched_setscheduler"):
        return
    try:
        threads = os.listdir("/proc/self/task")
    except OSError:
        return
    for tid in threads:
        try:
            with open(f"/proc/self/task/{tid}/comm") as comm:
                if not comm.read().startswith("pyreqwest"):
                    continue
            if os.sched_getscheduler(int(tid)) != os.SCHED_BATCH:
                os.sched_setscheduler(int(tid), os.SCHED_BATCH, os.sched_param(0))
        except OSError as exc:  # the thread is gone, or the policy is not ours to change
            log.debug("upstream I/O thread %s keeps its scheduling policy (%s)", tid, exc)


class UpstreamClient:
    """Two pools with one configuration but their timeouts: an answer read whole is bounded as a whole
    (GATEWAY_REQUEST_TIMEOUT_S), one kept open — a stream, a download — only in the gap between reads
    (GATEWAY_STREAM_READ_TIMEOUT_S), since a stream lasts as long as the model writes. reqwest sets a
    read timeout per client, not per request, and a non-streamed reasoning call may think for longer
    than a stream's gap."""

    def __init__(self, settings: Settings) -> None:
        self.policy = RetryPolicy(settings)
        self.suppress_client_retries = settings.suppress_client_retries and settings.max_attempts > 1
        # The longest SSE event a relay of this client's streams holds while waiting for its end.
        self.max_event_bytes = settings.max_event_bytes
        self._settings = settings
        self._total = timedelta(seconds=settings.request_timeout_s)
        self._deadline_s = settings.retry_deadline_s
        # An answer read whole is bounded by one timeout of pyreqwest's, which closes the connection when
        # it fires: the request timeout, or less when the deadline leaves less.
        self._whole_limit_s = min(settings.request_timeout_s, settings.retry_deadline_s)
        self._whole_limit = timedelta(seconds=self._whole_limit_s)
        self._max_answer = settings.max_answer_bytes
        # The longest an attempt on the open client can take by that client's own timeouts: a free
        # connection (pool timeout), then the response head (reqwest's read timeout runs from the send,
        # connecting included), then the first bytes.
        self._open_bound_s = 3 * settings.stream_read_timeout_s
        self._whole: Client | None = None
        self._open: Client | None = None
        # URLs called, parsed once (see _parsed).
        self._urls: dict[str, Url] = {}
        # Set when traces are exported: each attempt a span, its traceparent sent upstream.
        self.tracing: Tracing | None = None

    def _client(self, read_timeout_s: float | None) -> Client:
        settings = self._settings
        # Waiting for a free connection counts as part of the call (a stream holds one all its life): the
        # whole answer's timeout bounds it, and a stream waits no longer than for its next event.
        pool_timeout = self._total if read_timeout_s is None else timedelta(seconds=read_timeout_s)
        builder = (
            ClientBuilder()
            .connect_timeout(timedelta(seconds=settings.connect_timeout_s))
            .pool_timeout(pool_timeout)
            .pool_idle_timeout(timedelta(seconds=30))
            .max_connections(settings.upstream_max_connections)
            # The upstream is configured (OPENAI_BASE_URL), not found through the environment's proxy
            # settings; and no cookies, or one client's state would leak into another's calls.
            .no_proxy()
            .default_cookie_store(False)
            .follow_redirects(False)
        )
        if read_timeout_s is not None:
            builder = builder.read_timeout(timedelta(seconds=read_timeout_s))
        return builder.build()

    async def start(self) -> None:
        self._whole = self._client(None)
        self._open = self._client(self._settings.stream_read_timeout_s)
        # pyreqwest starts its I/O thread with the first client.
        io_threads_yield_to_the_loop()

    async def close(self) -> None:
        for client in (self._whole, self._open):
            if client is not None:
                await client.close()

    def relay_headers(self, response: UpstreamResponse) -> dict[str, str]:
        return relay_response_headers(response.headers)

    def error_headers(self, response: UpstreamResponse) -> dict[str, str]:
        """Headers for an upstream error relayed to the client after the gateway's retries."""
        headers = relay_response_headers(response.headers)
        if self.suppress_client_retries and is_retryable_status(response.status, response.headers):
            # The gateway already retried; the SDK's own retries would multiply the attempts.
            headers["x-should-retry"] = "false"
        return headers

    async def send(
        self,
        target: UpstreamTarget,
        method: str,
        path: str,
        *,
        body: bytes | AsyncIterable[bytes],
        headers: Mapping[str, str],
        call: CallRecord,
        keep_open: Callable[[ResponseHead], bool] = is_sse,
        replayable: bool = True,
    ) -> UpstreamResponse:
        """One call with retries, all of it within GATEWAY_RETRY_DEADLINE_S of its first attempt (shared
        with the fallbacks that follow it). A response for which `keep_open` is true comes back open,
        with its first bytes already read; any other is read whole. When the request is not
        `replayable` (a streamed upload, a non-idempotent passthrough), only failures before a
        connection existed are retried: until then not a byte of the body has left."""
        assert self._whole is not None and self._open is not None, "UpstreamClient.start() was not awaited"
        whole = keep_open is never_open
        client = self._whole if whole else self._open
        if "?" in path:  # a client's query (the passthrough's): it may not name the api-version
            url = with_api_version(target.base_url + path, target.api_version)
        else:
            url = target.base_url + path + target.query
        parsed = self._parsed(url)
        headers = {**headers, **target.headers}
        deadline = call.outcome.upstream_deadline
        fresh = deadline is None
        if deadline is None:
            deadline = call.outcome.upstream_deadline = time.perf_counter() + self._deadline_s

        # Not a coroutine of its own but the one to await: a frame less at each of the attempt's waits.
        def attempt() -> Awaitable[UpstreamResponse]:
            nonlocal fresh
            # The call's first attempt starts microseconds after its deadline was set: all of it is left.
            budget = self._deadline_s if fresh else deadline - time.perf_counter()
            fresh = False
            if budget <= 0:  # a fallback after the deadline (the policy starts no retry past it)
                raise TimeoutError("the call's deadline has passed")
            call.outcome.attempts += 1
            builder = client.request(method, parsed).headers(headers)
            if not isinstance(body, bytes):
                builder = builder.body_stream(body)
            elif body:
                builder = builder.body_bytes(body)
            if whole:
                limit = self._whole_limit if budget >= self._whole_limit_s else timedelta(seconds=budget)
                return self._exchange(builder.timeout(limit).build_streamed(), keep_open)
            # Each chunk is handed over as it arrives: with a larger read-ahead, pyreqwest holds a stream's
            # first events back until that many bytes have come.
            request = builder.streamed_read_buffer_limit(1).build_streamed()
            if budget >= self._open_bound_s:
                return self._exchange(request, keep_open)
            return self._bounded_exchange(request, keep_open, budget)

        run: Callable[[], Awaitable[UpstreamResponse]] = attempt
        if self.tracing is not None:
            run = self.tracing.attempts(attempt, headers, method, url, call)
        try:
            result = await self.policy.run(run, deadline=deadline, replayable=replayable)
        except TimeoutError as exc:  # pyreqwest's timeouts are TimeoutErrors
            raise UpstreamUnavailable(
                "timeout", f"upstream timed out after {call.outcome.attempts} attempt(s)"
            ) from exc
        except (PyreqwestError, OSError) as exc:
            raise UpstreamUnavailable("connect", unreachable(target, call.outcome.attempts, exc)) from exc
        return result

    def _parsed(self, url: str) -> Url:
        """`url` parsed, as pyreqwest would parse the string on every call (~1 us of a call's CPU). Nearly
        every call goes to one of a few URLs (the metered endpoints'); the passthrough's may be any, so
        the cache starts over once it holds _MAX_URLS rather than grow, and a long URL is not kept."""
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = Url(url)
            if len(url) <= _MAX_URL_CHARS:
                if len(self._urls) >= _MAX_URLS:
                    self._urls.clear()
                self._urls[url] = parsed
        return parsed

    async def _bounded_exchange(
        self, request: StreamRequest, keep_open: Callable[[ResponseHead], bool], budget: float
    ) -> UpstreamResponse:
        # A timeout over the whole request would cut the stream's later events too: the deadline bounds
        # this attempt from the event loop instead. (pyreqwest goes on waiting for a cancelled request's
        # answer, up to the client's read timeout, and drops it then.)
        async with asyncio.timeout(budget):
            return await self._exchange(request, keep_open)

    async def _exchange(
        self, request: StreamRequest, keep_open: Callable[[ResponseHead], bool]
    ) -> UpstreamResponse:
        """Send `request` and take its answer: open with its first bytes read, or read whole."""
        response: Response | None = None
        kept = False
        try:
            response = await request.__aenter__()
            # The status, headers and reader taken from pyreqwest once each: every read of its objects
            # is a call into the extension, where the answer's own attributes are plain Python.
            answer = UpstreamResponse(response.status, response.headers, b"")
            status = answer.status
            if is_redirect(status):
                raise UpstreamUnavailable("redirect", f"the upstream redirected ({status}): not followed")
            reader = response.body_reader
            if keep_open(answer):
                first = await reader.read_chunk()
                if first is None and is_sse(answer):
                    raise UpstreamClosedEarly("upstream closed the stream before its first byte")
                kept = True
                answer.body = bytes(first or b"")
                answer.stream = UpstreamStream(request, reader, answer.headers, len(answer.body))
                return answer
            answer.body = await read_whole(reader, answer.headers, self._max_answer)
            return answer
        finally:
            # Read to its end, the connection goes back to the pool; otherwise it is closed. (Never
            # opened, there is nothing to close: pyreqwest refuses an exit without an entry.)
            if response is not None and not kept:
                await request.__aexit__(None, None, None)
