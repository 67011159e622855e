"""POST /v1/chat/completions: validated just enough to meter and route it, then relayed untouched."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from starlette.responses import Response

from app.access.deps import GatewayDep
from app.errors import bad_request
from app.ownership import body_check, caller
from app.ownership.created import record_created, stored_completion
from app.proxy.relay import Payload, forward, kept_alive
from app.proxy.streaming import ChatChunkInspector
from app.routes.metered import MeteredRequest, read_metered

PATH = "/chat/completions"


def _check_body(body: dict[str, Any]) -> None:
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
    # Checked here, before the call counts as metered, not where the usage chunk is asked for: input the
    # gateway refuses itself leaves no row.
    options = body.get("stream_options")
    if body.get("stream") is True and options is not None and not isinstance(options, dict):
        raise bad_request(
            "Invalid 'stream_options': expected an object.", param="stream_options", code="invalid_type"
        )


# Appended to the client's own bytes when it set no stream_options: re-serialising the whole body would
# cost orjson a few microseconds per kilobyte of prompt on every streamed call.
_WITH_USAGE = b',"stream_options":{"include_usage":true}}'


def _ask_for_usage(metered: MeteredRequest) -> tuple[bool, Payload]:
    """Make the upstream send its usage chunk; return whether the client itself asked for it, and the
    body to send."""
    body = metered.body
    options = body.get("stream_options")
    client_wants_usage = bool(options and options.get("include_usage") is True)
    body["stream_options"] = {**(options or {}), "include_usage": True}
    if not metered.modified:
        if client_wants_usage:
            return True, Payload(metered.raw, body)
        raw = metered.raw.rstrip()
        # A non-empty object (it has messages) without the key: adding it keeps the JSON valid.
        if options is None and raw.endswith(b"}"):
            return False, Payload(raw[:-1] + _WITH_USAGE, body)
    return client_wants_usage, Payload(metered.raw, body, modified=True)


async def chat_completions(request: Request, gw: GatewayDep) -> Response:
    call, who = gw.call, caller(request, gw)
    metered = await read_metered(request, gw, "/v1" + PATH, _check_body, body_check(who, "chat/completions"))
    stream = call.admitted.stream
    if stream:
        client_wants_usage, payload = _ask_for_usage(metered)
    else:
        client_wants_usage = False
        payload = Payload(metered.raw, metered.body, modified=metered.modified)

    async def answer() -> Response:
        response = await forward(
            gw.upstream,
            call,
            metered.candidates,
            path=PATH,
            payload=payload,
            client_headers=gw.headers,
            inspector=(lambda: ChatChunkInspector(call, client_wants_usage)) if stream else None,
            receive=request.receive,
            clients=request.app.state.client_watch,
        )
        await record_created(who, "chat.completion", stored_completion(metered.body), response)
        return response

    return await kept_alive(answer(), call, request.app.state.keepalives)
