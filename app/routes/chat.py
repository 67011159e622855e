"""POST /v1/chat/completions: validated just enough to meter it, then relayed untouched."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from app.attribution import attribute
from app.body import parse_object, read_body, require_str
from app.deps import CallDep, PrincipalDep, SettingsDep, UpstreamDep
from app.errors import bad_request
from app.relay import forward
from app.streaming import ChatChunkInspector

router = APIRouter()

PATH = "/chat/completions"


def _check_messages(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if messages is None:
        raise bad_request(
            "Missing required parameter: 'messages'.", param="messages", code="missing_required_parameter"
        )
    if not isinstance(messages, list) or not messages:
        raise bad_request(
            "Invalid 'messages': expected a non-empty array.", param="messages", code="invalid_type"
        )
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad_request(
                f"Invalid 'messages[{index}]': expected an object with a 'role'.",
                param=f"messages[{index}]",
                code="invalid_type",
            )


def _ask_for_usage(body: dict[str, Any]) -> bool:
    """Make the upstream send its usage chunk; return whether the client itself asked for it."""
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request(
            "Invalid 'stream_options': expected an object.", param="stream_options", code="invalid_type"
        )
    client_wants_usage = bool(options and options.get("include_usage") is True)
    body["stream_options"] = {**(options or {}), "include_usage": True}
    return client_wants_usage


@router.post("/v1/chat/completions")
async def chat_completions(
    request: Request, _: PrincipalDep, settings: SettingsDep, upstream: UpstreamDep, call: CallDep
) -> Response:
    raw = await read_body(request, settings.max_body_bytes)
    body = parse_object(raw)
    call.model = require_str(body, "model")
    _check_messages(body)
    attribute(call, request.headers, body)
    call.endpoint = "/v1" + PATH
    call.request_body = body
    call.stream = body.get("stream") is True
    if not call.stream:
        return await forward(
            upstream, call, path=PATH, payload=raw, client_headers=dict(request.headers), inspector=None
        )
    client_wants_usage = _ask_for_usage(body)
    return await forward(
        upstream,
        call,
        path=PATH,
        payload=orjson.dumps(body),
        client_headers=dict(request.headers),
        inspector=lambda: ChatChunkInspector(call, client_wants_usage),
    )
