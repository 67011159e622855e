"""create_app(): settings, the lifespan that owns the process-wide clients, routers and middleware."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sse_starlette.sse import AppStatus
from starlette.types import ASGIApp

from app.config import ConfigError, Settings, load_settings
from app.db.engine import create_engine
from app.errors import install_error_handlers
from app.logs import configure_logging
from app.request_context import RequestContextMiddleware
from app.routes import chat, health
from app.upstream import UpstreamClient


class GatewayApp(FastAPI):
    def build_middleware_stack(self) -> ASGIApp:
        # Outside Starlette's ServerErrorMiddleware, so even an unexpected 500 carries its X-Request-Id
        # and gets its access-log line.
        return RequestContextMiddleware(super().build_middleware_stack())


def _settings_or_exit() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        # One clear line for the operator, not a traceback.
        print(f"llm-gateway: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or _settings_or_exit()
    configure_logging(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        upstream = UpstreamClient(settings)
        await upstream.start()
        engine = create_engine(settings.database_url, settings.data_dir)
        app.state.upstream = upstream
        app.state.engine = engine
        try:
            yield
        finally:
            await upstream.close()
            await engine.dispose()

    app = GatewayApp(title="llm-gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(chat.router)
    # sse-starlette cancels open streams on SIGTERM by default; we let them finish within uvicorn's
    # graceful-shutdown deadline instead (sse-starlette issue #167).
    AppStatus.disable_automatic_graceful_drain()  # type: ignore[no-untyped-call]
    return app
