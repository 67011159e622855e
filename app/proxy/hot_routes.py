"""The metered POST endpoints, served straight from ASGI ahead of FastAPI.

In the benchmark's profile (docs/performance-log.md, optimisation log) FastAPI's route matching and
dependency solving took about 40% of the event loop per request, and these endpoints carry nearly all of
a gateway's traffic. Every other path goes on to FastAPI; the handlers are the same functions either way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Generic, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.call.record import get_call
from app.errors import error_response

# What a handler is handed besides the request (the routes' `Gateway`), made by `prepare`.
Prepared = TypeVar("Prepared")


class HotRoutes(Generic[Prepared]):
    def __init__(
        self,
        app: ASGIApp,
        routes: Mapping[str, Callable[[Request, Prepared], Awaitable[Response]]],
        prepare: Callable[[Request], Awaitable[Prepared]],
    ) -> None:
        self.app = app
        self.routes = dict(routes)
        self.prepare = prepare

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = (
            self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        )
        if handler is None:
            await self.app(scope, receive, send)
            return
        call = get_call(scope)
        if call is not None:
            # Labelled by its route even when it is refused before it is metered.
            call.route = scope["path"]
        request = Request(scope, receive)
        try:
            response = await handler(request, await self.prepare(request))
        except Exception as exc:
            answer = error_response(exc)
            if answer is None:
                if call is not None:
                    call.outcome.client_disconnected = True
                return
            response = answer
        await response(scope, receive, send)
