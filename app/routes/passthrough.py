"""Every other /v1/* path (files, uploads, vector stores, batches, audio, images, moderations, …), passed
through in both directions as a stream: a 500 MB upload or download is never held in memory.

Retries: a request the gateway can replay (an idempotent method with a small, buffered body) is retried
like any call; any other only when no connection could be made, since then not a byte of it has left.
A JSON answer that carries `usage` (legacy completions, transcriptions, image generation and edits) is
metered. A call to one of those holds its worst-case cost against its budgets before it goes upstream, as
the metered routes' calls do (`estimate`), read from its JSON body or, for an upload, its multipart form
(`form`); the others, refused only by a budget already spent, can overshoot a cap by their own cost.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response, StreamingResponse

from app.batches.meter import observe as observe_batch
from app.call.record import CallRecord
from app.db.events import MAX_MODEL_CHARS, is_model_name
from app.edge.canonical_path import upstream_path
from app.errors import GatewayError, RelayedError
from app.limits import estimate
from app.limits.guard import Guard
from app.ownership import admit
from app.proxy.body import BodyDecoder, body_decoder, read_body
from app.proxy.form import read_form
from app.proxy.relay import answer_headers, send_checked
from app.proxy.upstream import ResponseHead, UpstreamResponse
from app.routes.deps import Gateway, GatewayDep
from app.wire import endpoints
from app.wire.dialect import Dialect

router = APIRouter()

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
# Bodies up to this size are read whole, so the call can be retried; larger ones are streamed.
_BUFFERED_BODY = 1024 * 1024
# JSON answers up to this size are read whole to look for usage; anything else streams back.
_INSPECTED_ANSWER = 8 * 1024 * 1024
# Response headers a client needs for files and downloads, beyond the ones every relay keeps.
_CONTENT_HEADERS = ("content-disposition", "content-range", "accept-ranges", "etag", "last-modified")


def _read_whole(response: ResponseHead) -> bool:
    length = response.headers.get("content-length", "")
    json = response.headers.get("content-type", "").startswith("application/json")
    return json and length.isdigit() and int(length) <= _INSPECTED_ANSWER


def _stream_back(response: ResponseHead) -> bool:
    return not _read_whole(response)


def _unless_json(response: ResponseHead) -> bool:
    """For answers ownership must read (a new object's id, a list to filter) whatever their size."""
    return not response.headers.get("content-type", "").startswith("application/json")


def _pages(gw: Gateway, path: str) -> Callable[[str], Awaitable[bytes]]:
    async def fetch(query: str) -> bytes:
        target = gw.policy.default_target
        answer = await send_checked(
            gw.upstream,
            gw.call,
            target,
            "GET",
            upstream_path(*path.split("/")) + f"?{query}",
            client_headers=gw.headers,
        )
        return answer.body

    return fetch


def _upload_too_large(limit: int) -> GatewayError:
    return GatewayError(
        413, f"Upload is larger than the gateway's limit of {limit} bytes.", code="request_too_large"
    )


async def _upload(request: Request, limit: int, decoder: BodyDecoder | None) -> AsyncIterator[bytes]:
    sent = 0
    async for chunk in request.stream():
        if decoder is not None:
            chunk = decoder.feed(chunk)
        sent += len(chunk)
        if sent > limit:
            raise _upload_too_large(limit)
        yield chunk
    if decoder is not None:
        decoder.end()


async def _download(answer: UpstreamResponse) -> AsyncIterator[bytes]:
    stream = answer.stream
    assert stream is not None
    try:
        if answer.body:
            yield answer.body
        while (chunk := await stream.read()) is not None:
            yield chunk
    finally:
        # Back to the pool when read to the end; closed (the upstream stops sending) otherwise.
        await stream.close()


def _worst_case(
    gw: Gateway, endpoint: endpoints.MeteredEndpoint[Dialect], raw: bytes
) -> tuple[str, estimate.WorstCase] | None:
    """The model a held call names and the most it may be billed for; None when it names none (the
    upstream refuses it)."""
    rule, config, feature = endpoint.held_output, gw.policy.config, gw.call.admitted.feature
    assert rule is not None
    if endpoint.form:
        # A body that is no form is refused here, before it holds or reaches anything.
        form = read_form(raw, gw.headers.get("content-type"), estimate.UPLOAD_FIELDS)
        model: object = form.fields.get("model")
        if not isinstance(model, str) or not model:
            return None
        if is_model_name(model):
            # Read here once: the answers of uploads do not name their model, so their rows take this one.
            gw.call.admitted.model = model
        tokens = estimate.upload_worst_case(
            rule, form.fields, form.files, form.file_bytes, config, feature, model
        )
        return model, tokens
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None  # the upstream answers it with its own 400
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str):
        return None
    output = estimate.passthrough_output(rule, body, config, feature, model)
    return model, estimate.WorstCase(estimate.prompt_tokens(raw), output)


async def _hold_worst_case(gw: Gateway, endpoint: endpoints.MeteredEndpoint[Dialect], raw: bytes) -> None:
    worst = _worst_case(gw, endpoint, raw)
    if worst is None:
        return
    model, tokens = worst
    cost = gw.prices.cost_usd(
        model,
        tokens.prompt,
        tokens.output,
        audio_prompt=tokens.audio_prompt,
        image_prompt=tokens.image_prompt,
    )
    if cost:
        guard: Guard = gw.services.guard
        gw.call.admitted.admission = await guard.hold(gw.call, gw.policy.config, cost)


def _requested_model(
    endpoint: endpoints.MeteredEndpoint[Dialect], raw: bytes, content_type: str | None
) -> str | None:
    if not endpoint.form:
        return endpoint.dialect.requested_model(raw)
    try:
        return read_form(raw, content_type, ("model",)).fields.get("model")
    except GatewayError:
        return None  # the upstream has answered it: not the gateway's to refuse now


def _meter_json(
    call: CallRecord, path: str, request_body: bytes | None, content_type: str | None, answer: bytes
) -> None:
    endpoint = endpoints.metered("/v1/" + path)
    if request_body and call.admitted.model is None:
        model = _requested_model(endpoint, request_body, content_type)
        # Learned after the call was answered, so not refused: a name no row can hold is left out, and
        # the row names the model the upstream says answered.
        if model is not None and is_model_name(model):
            call.admitted.model = model
    endpoint.dialect.read_answer(call.outcome, answer)
    if call.outcome.usage is not None:
        # Bounded as a model name is; no endpoint that reports usage comes near it.
        call.admitted.endpoint = endpoint.path[:MAX_MODEL_CHARS]


@router.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def passthrough(request: Request, path: str, gw: GatewayDep) -> Response:
    settings, upstream, call = gw.settings, gw.upstream, gw.call
    plan = await admit(gw.caller(), request.method, path, request.url.query)
    declared = gw.headers.get("content-length")
    length = int(declared) if declared is not None and declared.isdigit() else None
    limit = settings.max_upload_bytes
    if length is not None and length > limit:
        raise _upload_too_large(limit)
    # A compressed body goes upstream decoded, as it streams in: its size is known only at its end, and it
    # is not held to be replayed.
    decoder = body_decoder(gw.headers.get("content-encoding"), limit, lambda: _upload_too_large(limit))
    extra: dict[str, str] = {}
    buffered: bytes | None = None
    if length is None and "transfer-encoding" not in gw.headers:
        buffered = b""  # no body at all (RFC 9112 §6.3)
    elif decoder is None and length is not None and length <= _BUFFERED_BODY:
        buffered = await read_body(request, _BUFFERED_BODY, declared)
    elif decoder is None and length is not None:
        # Passed on, so the upstream sees a sized upload rather than a chunked one.
        extra["content-length"] = str(length)
    if plan is not None and plan.reads_body:
        if buffered is None:
            # Bodies naming other objects are small JSON: read whole (decoded), so the names can be checked.
            buffered = await read_body(request, _BUFFERED_BODY, declared, gw.headers.get("content-encoding"))
            extra = {}
        await plan.check_body(buffered)
    held = endpoints.holding("/v1/" + path) if request.method == "POST" else None
    if held is not None and call.admitted.admission is not None:
        if buffered is None:
            # Large or compressed, read whole (decoded) within the body limit a metered route applies,
            # so its worst case is known before it goes: JSON, or an upload whose form says it.
            buffered = await read_body(
                request, settings.max_body_bytes, declared, gw.headers.get("content-encoding")
            )
            extra = {}
        await _hold_worst_case(gw, held, buffered)
    query = f"?{request.url.query}" if request.url.query else ""
    batch_meter = gw.services.batch_meter
    intent = None
    if batch_meter is not None and request.method == "POST" and path == "batches" and buffered:
        intent = await batch_meter.intend(call, buffered)
    try:
        answer = await send_checked(
            upstream,
            call,
            gw.policy.default_target,
            request.method,
            upstream_path(*path.split("/")) + query,
            client_headers=gw.headers,
            body=buffered if buffered is not None else _upload(request, limit, decoder),
            keep_open=_unless_json if plan is not None and plan.reads_answer else _stream_back,
            replayable=buffered is not None and request.method in _IDEMPOTENT,
            extra_headers=extra,
        )
    except RelayedError:
        if intent is not None:
            intent.release(drop=True)  # the upstream answered, refusing it: nothing was created
        raise
    except BaseException:
        if intent is not None:
            # Whether the upstream created the batch is unknown: a metering round finds out.
            intent.release(drop=False)
        raise
    if plan is not None:
        answer = await plan.settle(answer, _pages(gw, path))
    headers = answer_headers(upstream, answer, call)
    headers.update({name: answer.headers[name] for name in _CONTENT_HEADERS if name in answer.headers})
    media_type = answer.headers.get("content-type")
    if answer.stream is None:
        _meter_json(call, path, buffered, gw.headers.get("content-type"), answer.body)
        observe_batch(batch_meter, request.method, path, answer.status, answer.body, call, intent)
        return Response(answer.body, status_code=answer.status, headers=headers, media_type=media_type)
    if intent is not None:
        intent.release(drop=answer.status >= 300)
    return StreamingResponse(
        _download(answer), status_code=answer.status, headers=headers, media_type=media_type
    )
