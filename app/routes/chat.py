"""POST /v1/chat/completions: validated just enough to meter and route it, then relayed untouched."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from starlette.responses import Response

from app.errors import bad_request
from app.ownership import body_check
from app.ownership.created import record_created, stored_completion
from app.routes.deps import GatewayDep
from app.routes.metered import forward_metered, read_metered
from app.wire.endpoints import CHAT


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


async def chat_completions(request: Request, gw: GatewayDep) -> Response:
    who = gw.caller()
    metered = await read_metered(request, gw, CHAT, _check_body, body_check(who, "chat/completions"))
    return await forward_metered(
        request,
        gw,
        CHAT,
        metered,
        lambda response: record_created(who, "chat.completion", stored_completion(metered.body), response),
    )
