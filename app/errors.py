"""OpenAI-format error bodies, so the SDKs raise the exception class that matches the status."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from app.db.migrate import BEHIND, is_schema_error

log = logging.getLogger("gateway.errors")

# The `type` OpenAI uses for each status it answers with.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_body(message: str, *, status: int, param: str | None = None, code: str | None = None) -> bytes:
    return orjson.dumps(
        {
            "error": {
                "message": message,
                "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
                "param": param,
                "code": code,
            }
        }
    )


class GatewayError(Exception):
    """An error the gateway itself answers with (as opposed to one relayed from the upstream)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def response(self) -> Response:
        return Response(
            error_body(self.message, status=self.status, param=self.param, code=self.code),
            status_code=self.status,
            headers=self.headers,
            media_type="application/json",
        )


class RelayedError(Exception):
    """An upstream error response, relayed as it came; raised so routes need no branch for it."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


def bad_request(message: str, param: str | None = None, code: str | None = None) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


async def _gateway_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return exc.response()


async def _relayed_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RelayedError)
    return exc.response


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif exc.status_code == 405:
        message = f"Method {request.method} not allowed for {request.url.path}"
    else:
        message = str(exc.detail)
    return GatewayError(exc.status_code, message, headers=exc.headers).response()


# What pydantic says when the body as a whole is not a JSON object: not a sentence an operator can act on.
_NOT_AN_OBJECT = frozenset({"model_attributes_type", "dict_type", "model_type", "missing"})


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    where = tuple(first.get("loc", ()))
    if where[:1] == ("body",) and (
        first.get("type") == "json_invalid" or (len(where) == 1 and first.get("type") in _NOT_AN_OBJECT)
    ):
        return bad_request(_body_problem(request, first.get("type") == "json_invalid")).response()
    loc = [str(part) for part in where if part not in ("body", "query", "path")]
    return bad_request(first.get("msg", "invalid request"), param=".".join(loc) or None).response()


def _body_problem(request: Request, malformed: bool) -> str:
    """Why the body is not the JSON object the route takes. FastAPI parses a body as JSON only when its
    Content-Type says so, and `curl -d` sends application/x-www-form-urlencoded unless told otherwise."""
    sent = request.headers.get("content-type")
    if sent is None or "json" not in sent.lower():
        got = f"got Content-Type: {sent[:100]}" if sent else "no Content-Type was sent"
        return f"Send the body as a JSON object with Content-Type: application/json ({got})."
    if malformed:
        return "The body is not valid JSON; send a JSON object."
    return "The body must be a JSON object."


def error_response(exc: Exception) -> Response | None:
    """The client's answer for an exception a route raised: a gateway error, a relayed upstream error,
    or — for anything unexpected — a 500 whose traceback goes to our log, never to the client. None
    when the client has gone and nothing can be answered."""
    if isinstance(exc, GatewayError):
        return exc.response()
    if isinstance(exc, RelayedError):
        return exc.response
    if isinstance(exc, ClientDisconnect):
        return None
    if is_schema_error(exc):
        # Not a bug to trace at every call: the operator has not migrated (the start-up log said so).
        return GatewayError(503, f"The gateway's database {BEHIND}.", code="schema_behind").response()
    log.error("unhandled error", exc_info=exc)
    return GatewayError(500, "The gateway hit an internal error.").response()


async def _unexpected(_: Request, exc: Exception) -> Response:
    return error_response(exc) or Response(status_code=499)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(RelayedError, _relayed_error)
    # The client went away while its body was being read: nobody is left to answer (499, as nginx logs it).
    app.add_exception_handler(ClientDisconnect, _unexpected)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    # Its own class, so that Starlette answers it without re-raising it to the server, which would log
    # a traceback even for a database that is only not migrated yet (error_response tells those apart).
    app.add_exception_handler(DBAPIError, _unexpected)
    app.add_exception_handler(Exception, _unexpected)
