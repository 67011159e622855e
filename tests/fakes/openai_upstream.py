"""A fake api.openai.com: a real aiohttp server on 127.0.0.1 for the tests, the demo and the benchmark.

    with FakeOpenAI() as fake:                       # background thread, ephemeral port
        fake.reply(content="Hi", usage={"cached_tokens": 12})
        fake.fail(429, headers={"retry-after-ms": "20"})
        client = openai.OpenAI(base_url=fake.base_url, api_key=fake.api_key)

    python -m tests.fakes.openai_upstream --port 9911 --first-token-delay-ms 20 --inter-token-delay-ms 5

Serves POST /v1/chat/completions, POST /v1/embeddings, POST /v1/moderations, GET /v1/models[/{id}]; the
Responses API and conversations (``responses_api``); files and vector stores (``files_api``); uploads
(``uploads_api``); audio transcriptions and translations and image edits (``media_api``); batches and
fine-tuning jobs (``jobs_api``); stored chat completions
(``chat_store_api``); the organization's Usage and Costs APIs, behind an admin key
(``organization_api``); anything else gets OpenAI's 404 "Invalid URL" body. Bodies, chunk framing and
default usage are described in ``openai_payloads`` and ``responses_payloads``; the objects the fake keeps
live in ``store``.

Deliberate divergences from OpenAI:
- one choice only (``n`` is ignored); no logprobs, audio or refusals;
- a missing Authorization header gets OpenAI's "You didn't provide an API key" 401, a wrong one the
  ``invalid_api_key`` 401; ``FakeOpenAI(auth="api-key")`` is Azure OpenAI instead: the key goes in an
  ``api-key`` header (Authorization is ignored), a request without it gets Azure's "Access denied" 401, and
  with ``api_version=`` every request must carry exactly that ``api-version`` query parameter (400
  otherwise);
- scripted faults are consumed by POST requests only, so a gateway's GET /v1/models probe cannot eat
  a fault a test meant for the next completion.

Each POST takes at most one fault off the FIFO (checked after auth, before any reply is taken); a chat
completion or a response then takes the next scripted reply, or the default one.

A multipart upload is never read whole: its RecordedRequest has ``body=b""`` and the file's size and
sha256 in ``upload_size`` / ``upload_sha256``; ``body_size`` is filled in for every request.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import gzip
import secrets
import signal
import ssl
import threading
import time
import zlib
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self

import orjson
import uvloop
from aiohttp import web

from tests.fakes import media_api, stateless_api
from tests.fakes import openai_payloads as p
from tests.fakes.answers import JSON_TYPE as JSON_TYPE
from tests.fakes.answers import SSE_TYPE as SSE_TYPE
from tests.fakes.answers import Answer, Download, Events, Handler, Incoming, Router
from tests.fakes.chat_store_api import ChatStoreAPI
from tests.fakes.faults import Cut, Drop, Fail, Fault, Flood, RawStream, SlowFirstByte, Stall
from tests.fakes.files_api import FilesAPI
from tests.fakes.jobs_api import JobsAPI
from tests.fakes.organization_api import OrganizationAPI
from tests.fakes.responses_api import ResponsesAPI
from tests.fakes.store import FakeStore
from tests.fakes.uploads_api import UploadsAPI


@dataclass
class RecordedRequest:
    """One request as the fake saw it; the fields after ``request_id`` are filled in as it is answered."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes
    json: Any | None
    request_id: str  # the x-request-id the fake answered with
    usage: dict[str, Any] | None = None  # as sent in the body; None when no usage reached the client
    status: int | None = None  # None when the fake dropped the connection or never answered
    disconnected: bool = False  # the client went away before the fake had finished
    compressed: bool = False  # the answer went gzip-compressed (FakeOpenAI(gzip=True))
    received_at: float = field(default_factory=time.monotonic)  # when the request arrived
    body_size: int = 0  # request body bytes; an upload's are counted as it streams in (0 if never read)
    upload_filename: str | None = None  # multipart uploads: the file part's filename,
    upload_size: int | None = None  # its size in bytes
    upload_sha256: str | None = None  # and the hex sha256 of its content,
    form: dict[str, str] | None = None  # and the other (text) fields
    query_string: str = ""  # the query as it came, undecoded (``query`` keeps one value a name)


@dataclass
class _Call:
    request: web.Request
    record: RecordedRequest
    started: float = field(default_factory=time.monotonic)


class FakeOpenAI:
    """Thread-safe: script it and read its log from any thread while it serves on its own loop."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str = "sk-upstream-test",
        admin_key: str = "sk-admin-upstream-test",
        first_token_delay_s: float = 0.0,
        inter_token_delay_s: float = 0.0,
        stream_usage: bool = True,
        record_requests: bool = True,
        background_delay_s: float = 0.2,
        ingest_delay_s: float = 0.0,
        job_delay_s: float = 0.2,
        ssl_context: ssl.SSLContext | None = None,
        gzip: bool = False,
        reply_pieces: int | None = None,
        write_bytes: int | None = None,
        auth: Literal["bearer", "api-key"] = "bearer",
        api_version: str | None = None,
    ) -> None:
        self.host, self.port, self.api_key = host, port, api_key
        # Which header carries the key ("api-key": as Azure OpenAI), and the api-version it insists on.
        self.auth, self.api_version = auth, api_version
        # Served over TLS when given (a test's private CA), as OpenAI itself is.
        self.ssl_context = ssl_context
        # Answers gzip-compressed for a client that accepts it, streams flushed event by event.
        self.gzip = gzip
        # Each event written in pieces of at most this many bytes, as an upstream behind TLS delivers a
        # large one (16 KiB records); None: one write an event.
        self.write_bytes = write_bytes
        # Off for the benchmark: a log of every request would grow without bound.
        self.record_requests = record_requests
        self.first_token_delay_s = first_token_delay_s
        self.inter_token_delay_s = inter_token_delay_s
        self.stream_usage = stream_usage
        # The benchmark's long streams: an unscripted chat answer in this many pieces instead of the default.
        self._unscripted = p.Reply(chunks=[" word"] * reply_pieces) if reply_pieces else None
        self.background_delay_s = background_delay_s  # how long a background response takes
        self.ingest_delay_s = ingest_delay_s  # how long a file attached to a vector store stays in_progress
        self.job_delay_s = job_delay_s  # how long a batch or a fine-tuning job takes
        # Cleared: batches are created, but their creation is not answered until it is set (crash tests).
        self.batch_answers = threading.Event()
        self.batch_answers.set()
        self.store = FakeStore()
        self._router = Router()
        ResponsesAPI(self.store, self._take_reply, lambda: self.background_delay_s).register(self._router)
        FilesAPI(self.store, lambda: self.ingest_delay_s).register(self._router)
        UploadsAPI(self.store).register(self._router)
        self._chat_store = ChatStoreAPI(self.store)
        self._chat_store.register(self._router)
        JobsAPI(self.store, lambda: self.job_delay_s, self.batch_answers).register(self._router)
        stateless_api.register(self._router)
        media_api.register(self._router)
        # The organization's Usage and Costs APIs answer to the admin key only.
        self.organization = OrganizationAPI(admin_key)
        self.organization.register(self._router)
        self.client_disconnected = threading.Event()  # set when any client leaves mid-answer
        self._cond = threading.Condition()
        self._requests: list[RecordedRequest] = []
        self._replies: deque[p.Reply] = deque()
        # Per method: scripted faults hit POSTs unless a test names another method.
        self._faults: dict[str, deque[Fault]] = defaultdict(deque)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    # -- lifecycle -------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if not self.port:
            raise RuntimeError("FakeOpenAI is not started")
        return f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}/v1"

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("FakeOpenAI is already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(self.serve(on_ready=ready.set))
            except Exception as exc:  # surfaced to start()'s caller below
                failure.append(exc)
                ready.set()

        self._thread = threading.Thread(target=run, name=f"fake-openai-{id(self):x}", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._request_stop()
        thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def serve(self, on_ready: Callable[[], None] | None = None) -> None:
        """Serve on the running loop until stop() (or a signal, when run as a script)."""
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        # handler_cancellation: without it aiohttp (>= 3.9) lets a handler run on after the client has
        # gone, and a hanging stream would never learn of it.
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port, ssl_context=self.ssl_context).start()
            self.port = runner.addresses[0][1]
            if on_ready is not None:
                on_ready()
            await self._stopping.wait()
        finally:
            await runner.cleanup()

    def _request_stop(self) -> None:
        if self._loop is not None and self._stopping is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stopping.set)

    # -- scripting -------------------------------------------------------------------------------------

    def reply(
        self,
        content: str | None = None,
        *,
        tool_calls: Sequence[Mapping[str, Any]] | None = None,
        usage: Mapping[str, Any] | None = None,
        model: str | None = None,
        finish_reason: str | None = None,
        chunks: Sequence[str] | None = None,
        stream_usage: bool | None = None,
    ) -> None:
        """Queue the answer of the next chat completion (FIFO)."""
        with self._cond:
            self._replies.append(
                p.Reply(content, tool_calls, usage, model, finish_reason, chunks, stream_usage)
            )

    def fail(
        self,
        status: int,
        times: int = 1,
        body: Mapping[str, Any] | str | bytes | None = None,
        headers: Mapping[str, str] | None = None,
        method: str = "POST",
        delay_s: float = 0.0,
    ) -> None:
        """Answer the next ``times`` requests of ``method`` with an OpenAI error (or ``body`` as given),
        after ``delay_s``."""
        self._add_fault(Fail(status, body, dict(headers or {}), delay_s), times, method)

    def drop_connection(self, times: int = 1) -> None:
        self._add_fault(Drop(), times)

    def drop_mid_stream(self, after_chunks: int = 1, times: int = 1) -> None:
        self._add_fault(Cut(after_chunks, hang=False), times)

    def hang_stream(self, chunks_before_hang: int = 1, times: int = 1) -> None:
        """Send some events (none for a non-streamed call), then wait for the client to leave."""
        self._add_fault(Cut(chunks_before_hang, hang=True), times)

    def stream_raw(
        self, *pieces: bytes, endless: bytes | None = None, gap_s: float = 0.0, end_delay_s: float = 0.0
    ) -> None:
        """Answer the next POST with an SSE stream of exactly these bytes (one write each, ``gap_s``
        apart), whatever it asked for; then, with ``endless``, write that piece until the client leaves;
        else end the body (the chunked terminator) ``end_delay_s`` after the last piece."""
        self._add_fault(RawStream(pieces, endless, gap_s, end_delay_s), 1)

    def slow_first_byte(self, seconds: float, times: int = 1) -> None:
        self._add_fault(SlowFirstByte(seconds), times)

    def stall(self, times: int = 1) -> None:
        """Take the next ``times`` requests whole, then send nothing until the client leaves."""
        self._add_fault(Stall(), times)

    def flood(self, size: int, framing: str = "length") -> None:
        """Answer the next request with a JSON body of about ``size`` bytes (``faults.Flood``)."""
        self._add_fault(Flood(size, framing), 1)

    def _add_fault(self, fault: Fault, times: int, method: str = "POST") -> None:
        with self._cond:
            self._faults[method].extend([fault] * times)

    def _take_reply(self) -> p.Reply | None:
        with self._cond:
            return self._replies.popleft() if self._replies else None

    def reset(self) -> None:
        with self._cond:
            self._requests.clear()
            self._replies.clear()
            self._faults.clear()
            self.client_disconnected.clear()
        self.store.clear()
        self.organization.clear()

    # -- request log -----------------------------------------------------------------------------------

    def polls(self, response_id: str) -> int:
        """How many times GET /v1/responses/{response_id} was asked for."""
        with self.store.lock:
            return self.store.polls.get(response_id, 0)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._cond:
            return list(self._requests)

    def wait_for(self, predicate: Callable[[RecordedRequest], bool], timeout: float = 5.0) -> RecordedRequest:
        """The first recorded request matching ``predicate``, waiting for one up to ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                match = next((r for r in self._requests if predicate(r)), None)
                if match is not None:
                    return match
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [(r.method, r.path, r.status, r.disconnected) for r in self._requests]
                    raise TimeoutError(f"no request matched in {timeout}s; saw {seen}")
                self._cond.wait(remaining)

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[RecordedRequest]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._requests) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"saw {len(self._requests)} of {n} requests in {timeout}s")
                self._cond.wait(remaining)
            return list(self._requests)

    async def wait_for_async(
        self,
        predicate: Callable[[RecordedRequest], bool],
        timeout: float = 5.0,  # noqa: ASYNC109 - the deadline lives in wait_for, on a worker thread
    ) -> RecordedRequest:
        """wait_for() off the event loop, for tests whose gateway shares the test's loop."""
        return await asyncio.to_thread(self.wait_for, predicate, timeout)

    def _update(self, record: RecordedRequest, **changes: Any) -> None:
        usage = changes.get("usage")
        if usage and changes.get("status") == 200:
            self.organization.served(record.path, record.json, usage)
        with self._cond:
            for name, value in changes.items():
                setattr(record, name, value)
            self._cond.notify_all()
        if changes.get("disconnected"):
            self.client_disconnected.set()

    # -- HTTP ------------------------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        # An upload is left on the socket for its endpoint to stream through (files_api).
        multipart = request.content_type.startswith("multipart/")
        body = b"" if multipart else await request.read()
        try:
            parsed = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            parsed = None
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            json=parsed,
            request_id="req_" + secrets.token_hex(16),
            body_size=len(body),
            query_string=request.query_string,
        )
        if self.record_requests:
            with self._cond:
                self._requests.append(record)
                self._cond.notify_all()
        call = _Call(request, record)
        try:
            return await self._answer(call)
        except (asyncio.CancelledError, ConnectionResetError) as exc:
            # Cancelled by stop() is not a client leaving.
            if self._stopping is None or not self._stopping.is_set():
                self._update(record, disconnected=True)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return web.Response()

    async def _answer(self, call: _Call) -> web.StreamResponse:
        request = call.request
        refusal = self._azure_refusal(request) if self.auth == "api-key" else self._openai_refusal(request)
        if refusal is not None:
            return await self._error(call, *refusal)
        endpoint = self._route(request.method, request.path)
        if endpoint is None:
            message = f"Invalid URL ({request.method} {request.path})"
            return await self._error(call, 404, p.error(message, "invalid_request_error"))
        fault: Fault | None = None
        with self._cond:
            queue = self._faults.get(request.method)
            fault = queue.popleft() if queue else None
        if isinstance(fault, Drop):
            return self._drop(call)
        if isinstance(fault, Fail):
            await asyncio.sleep(fault.delay_s)
            return await self._fail(call, fault)
        if isinstance(fault, RawStream):
            return await self._raw_stream(call, fault)
        if isinstance(fault, Stall):
            return await self._cut(call, Cut(0, hang=True), None)
        if isinstance(fault, Flood):
            return await self._flood(call, fault)
        if isinstance(fault, SlowFirstByte):
            await asyncio.sleep(fault.seconds)
        return await endpoint(call, fault if isinstance(fault, Cut) else None)

    def _openai_refusal(self, request: web.Request) -> tuple[int, Mapping[str, Any]] | None:
        auth = request.headers.get("Authorization")
        admin = request.path.startswith("/v1/organization/")
        if auth == f"Bearer {self.api_key}" and admin:
            return 403, p.error(p.ADMIN_ONLY_MESSAGE, "invalid_request_error")
        if auth == f"Bearer {self.organization.admin_key if admin else self.api_key}":
            return None
        if auth is None:
            return 401, p.error(p.NO_KEY_MESSAGE, "invalid_request_error")
        given = p.mask_key(auth.removeprefix("Bearer "))
        message = (
            f"Incorrect API key provided: {given}. "
            "You can find your API key at https://platform.openai.com/account/api-keys."
        )
        return 401, p.error(message, "invalid_request_error", "invalid_api_key")

    def _azure_refusal(self, request: web.Request) -> tuple[int, Mapping[str, Any]] | None:
        """Azure OpenAI's checks, before anything else: the key in `api-key`, then the api-version."""
        admin = request.path.startswith("/v1/organization/")
        if request.headers.get("api-key") != (self.organization.admin_key if admin else self.api_key):
            return 401, p.error(p.AZURE_ACCESS_DENIED, "invalid_request_error", "401")
        versions = request.query.getall("api-version", [])
        if self.api_version is not None and versions != [self.api_version]:
            return 400, p.error("API version not supported", "invalid_request_error", "BadRequest")
        return None

    def _route(
        self, method: str, path: str
    ) -> Callable[[_Call, Cut | None], Awaitable[web.StreamResponse]] | None:
        if method == "POST" and path == "/v1/chat/completions":
            return self._chat
        if (found := self._router.match(method, path)) is not None:
            handler, params = found
            return lambda call, cut: self._deliver(handler, params, call, cut)
        return None

    async def _chat(self, call: _Call, cut: Cut | None) -> web.StreamResponse:
        body = call.record.json
        if (problem := p.invalid_request(body, "messages")) is not None:
            return await self._error(call, 400, problem)
        assert isinstance(body, dict)
        if body.get("stream_options") is not None and body.get("stream") is not True:
            message = "The 'stream_options' parameter is only allowed when 'stream' is enabled."
            problem = p.error(message, "invalid_request_error", None, "stream_options")
            return await self._error(call, 400, problem)
        plan = p.plan_reply(body, self._take_reply() or self._unscripted)
        completion_id, created = p.random_id("chatcmpl-", 29), int(time.time())
        if body.get("store") is True:
            self._chat_store.keep(body, p.completion_body(plan, completion_id, created))
        if body.get("stream") is True:
            return await self._stream(call, body, plan, completion_id, created, cut)
        # A non-streamed answer takes as long as the same answer streamed would.
        delay = self.first_token_delay_s + self.inter_token_delay_s * max(0, len(plan.pieces) - 1)
        if delay:
            await asyncio.sleep(delay)
        payload = p.dump_body(p.completion_body(plan, completion_id, created))
        return await self._send(call, 200, payload, cut, usage=plan.usage)

    async def _stream(
        self,
        call: _Call,
        body: dict[str, Any],
        plan: p.Plan,
        completion_id: str,
        created: int,
        cut: Cut | None,
    ) -> web.StreamResponse:
        options = body.get("stream_options") or {}
        sends_usage = self.stream_usage if plan.stream_usage is None else plan.stream_usage
        include_usage = options.get("include_usage") is True and sends_usage
        chunks = p.stream_chunks(
            plan,
            completion_id,
            created,
            include_usage=include_usage,
            obfuscate=options.get("include_obfuscation") is not False,
        )
        events = [p.sse(chunk) for chunk in chunks]
        usage = plan.usage if include_usage else None
        return await self._write_events(call, Events(events, usage, p.DONE, plan.usage["prompt_tokens"]), cut)

    async def _write_events(self, call: _Call, answer: Events, cut: Cut | None) -> web.StreamResponse:
        headers = self._headers(call, SSE_TYPE, answer.tokens)
        compressor = self._compressor(call, headers)
        response = web.StreamResponse(headers=headers)
        await response.prepare(call.request)
        if not answer.lead and self.first_token_delay_s:
            await asyncio.sleep(self.first_token_delay_s)
        for index, event in enumerate(answer.events[: cut.after_chunks] if cut else answer.events):
            delay = self.first_token_delay_s if index == answer.lead else self.inter_token_delay_s
            if index and index >= answer.lead and delay:
                await asyncio.sleep(delay)
            # One write per event (or per piece of it): each is flushed as written (compressed, up to a
            # sync point).
            data = compressor.compress(event) + compressor.flush(zlib.Z_SYNC_FLUSH) if compressor else event
            step = self.write_bytes or len(data)
            for start in range(0, len(data), max(step, 1)):
                await response.write(data[start : start + step])
        if cut is not None:
            return await self._cut(call, cut, response)
        # Recorded before the tail ([DONE]) goes: a client that has read the whole stream (a test, then
        # looking at the record) must find it, not race this handler's last steps.
        self._update(call.record, status=200, usage=answer.usage)
        if answer.tail:
            await response.write(compressor.compress(answer.tail) if compressor else answer.tail)
        if compressor:
            await response.write(compressor.flush())
        await response.write_eof()
        return response

    async def _raw_stream(self, call: _Call, raw: RawStream) -> web.StreamResponse:
        response = web.StreamResponse(headers=self._headers(call, SSE_TYPE))
        await response.prepare(call.request)
        for index, piece in enumerate(raw.pieces):
            if index and raw.gap_s:
                await asyncio.sleep(raw.gap_s)
            await response.write(piece)
        while raw.endless is not None:
            await response.write(raw.endless)
            # A write that needs no drain does not yield: the client's leaving must get a turn.
            await asyncio.sleep(0)
        if raw.end_delay_s:
            await asyncio.sleep(raw.end_delay_s)
        await response.write_eof()
        self._update(call.record, status=200)
        return response

    async def _deliver(
        self, handler: Handler, params: dict[str, str], call: _Call, cut: Cut | None
    ) -> web.StreamResponse:
        answer: Answer = await handler(Incoming(call.request, call.record.json, params))
        if isinstance(answer, Events):
            return await self._write_events(call, answer, cut)
        if isinstance(answer, Download):
            # Faults are POST-only and downloads GET-only: no cut to apply.
            response = web.StreamResponse(headers=self._headers(call, answer.content_type))
            response.content_length = answer.size
            await response.prepare(call.request)
            for chunk in answer.chunks:
                await response.write(chunk)
            await response.write_eof()
            self._update(call.record, status=200)
            return response
        if answer.record:
            self._update(call.record, **answer.record)
        if answer.pieces is not None and answer.status < 400:
            delay = self.first_token_delay_s + self.inter_token_delay_s * max(0, answer.pieces - 1)
            if delay:
                await asyncio.sleep(delay)
        return await self._send(
            call,
            answer.status,
            answer.payload,
            cut if answer.status < 400 else None,
            answer.content_type,
            answer.headers,
            answer.usage,
        )

    async def _fail(self, call: _Call, fault: Fail) -> web.StreamResponse:
        if fault.body is None:
            body = call.record.json if isinstance(call.record.json, dict) else {}
            error = p.status_error(fault.status, str(body.get("model", "the model")))
            return await self._error(call, fault.status, error, fault.headers)
        if isinstance(fault.body, Mapping):
            return await self._error(call, fault.status, fault.body, fault.headers)
        raw = fault.body.encode() if isinstance(fault.body, str) else fault.body
        return await self._send(call, fault.status, raw, None, "text/plain; charset=utf-8", fault.headers)

    async def _error(
        self, call: _Call, status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> web.StreamResponse:
        return await self._send(call, status, p.dump_error(body), None, JSON_TYPE, headers)

    async def _send(
        self,
        call: _Call,
        status: int,
        payload: bytes,
        cut: Cut | None,
        content_type: str = JSON_TYPE,
        extra_headers: Mapping[str, str] | None = None,
        usage: dict[str, Any] | None = None,
    ) -> web.StreamResponse:
        headers = self._headers(call, content_type) | dict(extra_headers or {})
        if cut is not None and cut.hang:
            return await self._cut(call, cut, None)
        if cut is not None:
            # Promise the whole body, deliver half: the client must see a truncated response.
            response = web.StreamResponse(status=status, headers=headers)
            response.content_length = len(payload)
            await response.prepare(call.request)
            await response.write(payload[: len(payload) // 2])
            return self._drop(call, response)
        self._update(call.record, status=status, usage=usage)
        compressor = self._compressor(call, headers)
        if compressor:
            payload = compressor.compress(payload) + compressor.flush()
        return web.Response(status=status, body=payload, headers=headers)

    async def _flood(self, call: _Call, fault: Flood) -> web.StreamResponse:
        payload = b'{"object":"padding","pad":"' + b"x" * fault.size + b'"}'
        headers = self._headers(call, JSON_TYPE)
        self._update(call.record, status=200)
        if fault.framing == "gzip":
            headers["Content-Encoding"] = "gzip"
            return web.Response(body=gzip.compress(payload), headers=headers)
        if fault.framing == "length":
            return web.Response(body=payload, headers=headers)
        response = web.StreamResponse(headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(call.request)
        for start in range(0, len(payload), 65536):
            await response.write(payload[start : start + 65536])
        await response.write_eof()
        return response

    def _compressor(self, call: _Call, headers: dict[str, str]) -> Any:
        """A gzip compressor, with the header that says so, when this fake compresses and the client
        accepts gzip; else None."""
        if not self.gzip or "gzip" not in call.request.headers.get("Accept-Encoding", ""):
            return None
        headers["Content-Encoding"] = "gzip"
        call.record.compressed = True
        return zlib.compressobj(wbits=31)  # 31: the gzip container

    async def _cut(self, call: _Call, cut: Cut, response: web.StreamResponse | None) -> web.StreamResponse:
        if cut.hang and self._stopping is not None:
            # Only the client leaving (which cancels this handler) or stop() ends a hang.
            await self._stopping.wait()
        return self._drop(call, response)

    def _drop(self, call: _Call, response: web.StreamResponse | None = None) -> web.StreamResponse:
        # Closing the transport and returning at once: aiohttp then writes nothing more, and the client
        # sees "server disconnected" (or an incomplete body) rather than any HTTP status.
        if call.request.transport is not None:
            call.request.transport.close()
        return response if response is not None else web.Response()

    def _headers(self, call: _Call, content_type: str, tokens: int = 0) -> dict[str, str]:
        return {
            "Content-Type": content_type,
            "x-request-id": call.record.request_id,
            "openai-processing-ms": str(int((time.monotonic() - call.started) * 1000)),
            "openai-version": "2020-10-01",
            "x-ratelimit-limit-requests": "10000",
            "x-ratelimit-remaining-requests": "9999",
            "x-ratelimit-reset-requests": "6ms",
            "x-ratelimit-limit-tokens": "10000000",
            "x-ratelimit-remaining-tokens": str(10_000_000 - tokens),
            "x-ratelimit-reset-tokens": "0s",
        }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI upstream for the demo and the benchmark.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9911)
    parser.add_argument("--api-key", default="sk-upstream-test")
    parser.add_argument("--first-token-delay-ms", type=float, default=0.0)
    parser.add_argument("--inter-token-delay-ms", type=float, default=0.0)
    parser.add_argument("--reply-pieces", type=int, help="unscripted chat answers in this many pieces")
    parser.add_argument("--no-gc", action="store_true", help="no collector pauses (a benchmark's short life)")
    parser.add_argument("--no-stream-usage", action="store_true", help="ignore stream_options.include_usage")
    args = parser.parse_args(argv)
    if args.no_gc:
        # With a thousand streams open, a full collection stalls every one of them for tens of
        # milliseconds: the benchmark's upstream would then be what its time-to-first-byte measures.
        gc.disable()
    fake = FakeOpenAI(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        first_token_delay_s=args.first_token_delay_ms / 1000,
        inter_token_delay_s=args.inter_token_delay_ms / 1000,
        stream_usage=not args.no_stream_usage,
        record_requests=False,
        reply_pieces=args.reply_pieces,
    )

    def ready() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, fake._request_stop)
        print(fake.base_url, flush=True)

    # uvloop, the gateway's own loop: the benchmark's upstream must not be what a thousand concurrent
    # streams wait for (it took a tenth less CPU than asyncio's loop there).
    uvloop.run(fake.serve(on_ready=ready))


if __name__ == "__main__":
    main()
