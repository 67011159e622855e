"""Forward one metered call upstream and turn what comes back into the client's response."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from sse_starlette import EventSourceResponse
from starlette.responses import Response

from app.call import CallRecord, Usage
from app.errors import GatewayError
from app.streaming import EventInspector, collect_text, relay_sse
from app.upstream import UpstreamClient, UpstreamResponse, UpstreamUnavailable

ATTEMPTS_HEADER = "x-gateway-attempts"


def _upstream_error(upstream: UpstreamClient, response: UpstreamResponse, call: CallRecord) -> Response:
    attempts = {ATTEMPTS_HEADER: str(call.attempts)}
    if response.status == 401:
        # The caller's key was accepted by the gateway; a 401 would blame it for the gateway's own key.
        call.error_type = "upstream_auth"
        raise GatewayError(
            502,
            "The upstream rejected the gateway's own OPENAI_API_KEY; the gateway operator must fix it.",
            code="upstream_auth_failed",
            headers={**attempts, "x-should-retry": "false"},
        )
    call.error_type = _error_type(response.body) or f"upstream_{response.status}"
    return Response(
        response.body,
        status_code=response.status,
        headers={**upstream.error_headers(response), **attempts},
        media_type=response.headers.get("content-type", "application/json"),
    )


def _error_type(body: bytes) -> str | None:
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not isinstance(error, dict):
        return None
    value = error.get("code") or error.get("type")
    return value if isinstance(value, str) else None


def _json_usage(call: CallRecord, body: bytes) -> None:
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return
    if not isinstance(parsed, dict):
        return
    if isinstance(parsed.get("model"), str):
        call.upstream_model = parsed["model"]
    if isinstance(parsed.get("usage"), dict):
        call.usage = Usage.from_openai(parsed["usage"])
        return
    # No usage from this upstream: keep the answer's text so metering can count it.
    choices = parsed.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict):
            collect_text(message, call.completion_parts)


async def forward(
    upstream: UpstreamClient,
    call: CallRecord,
    *,
    path: str,
    payload: bytes,
    client_headers: dict[str, str],
    inspector: Callable[[], EventInspector] | None,
) -> Response:
    """Send `payload` to `path`; relay JSON whole, or an SSE stream event by event when `inspector` is
    given (it is made only once the upstream has answered with a stream)."""
    try:
        response = await upstream.send(
            "POST",
            path,
            body=payload,
            headers={**upstream.request_headers(client_headers), "content-type": "application/json"},
            stream=inspector is not None,
            call=call,
        )
    except UpstreamUnavailable as exc:
        call.error_type = f"upstream_{exc.kind}"
        status = 504 if exc.kind == "timeout" else 502
        headers = {ATTEMPTS_HEADER: str(call.attempts)}
        if upstream.suppress_client_retries:
            headers["x-should-retry"] = "false"
        raise GatewayError(status, str(exc), code=call.error_type, headers=headers) from None
    if response.status >= 400:
        return _upstream_error(upstream, response, call)
    headers = {**upstream.relay_headers(response), ATTEMPTS_HEADER: str(call.attempts)}
    if response.stream is None:
        _json_usage(call, response.body)
        call.mark_first_byte()
        return Response(
            response.body,
            status_code=response.status,
            headers=headers,
            media_type=response.headers.get("content-type", "application/json"),
        )
    assert inspector is not None
    # ping=0: OpenAI sends no keep-alive comments, and byte-for-byte relaying means we send none either.
    return EventSourceResponse(relay_sse(response, call, inspector()), headers=headers, ping=0)
