"""create_app(): settings, the lifespan that owns the process-wide clients, routers and middleware."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import ASGIApp, Receive, Scope, Send

from app.access.browser_tokens import signing_key
from app.access.keys import KeyStore
from app.batches.meter import BatchMeter, BatchSettings
from app.call.record import CallRecord
from app.config import ConfigError, Settings, load_settings
from app.config_file import GatewayConfig
from app.db.engine import create_engine
from app.db.migrate import BEHIND, SchemaCheck, database_revisions, is_behind
from app.db.partitions import PartitionKeeper
from app.edge.canonical_path import CanonicalPath
from app.edge.cors import Cors
from app.edge.request_context import RequestContextMiddleware
from app.errors import install_error_handlers
from app.limits import (
    BudgetLedger,
    InProcessBudgetLedger,
    InProcessRateLimiter,
    RateLimiter,
    RedisBudgetLedger,
    RedisRateLimiter,
    redis_client,
)
from app.limits.guard import Guard, seed_spend
from app.limits.policy import Policy
from app.live_config import ConfigHolder, LiveConfig, load_gateway_config
from app.logs import configure_logging
from app.metering import tokens
from app.metering.metrics import WORKER_METRICS_DIR, Metrics
from app.metering.middleware import Meter, meter_call
from app.metering.pricing import PriceTable
from app.metering.recorder import Recorder
from app.ownership.store import OwnerStore
from app.proxy.background import BackgroundResponses
from app.proxy.client_watch import ClientWatch
from app.proxy.hot_routes import HotRoutes
from app.proxy.streaming import KeepAlives
from app.proxy.upstream import UpstreamClient
from app.reconcile.job import Reconciler
from app.routes import (
    admin,
    browser_tokens,
    chat,
    embeddings,
    health,
    metrics,
    models,
    passthrough,
    responses,
    usage,
)
from app.routes.dashboard import router as dashboard_router
from app.routes.deps import gateway
from app.services import Services

if TYPE_CHECKING:
    from app.tracing import Tracing

log = logging.getLogger("gateway")


HOT_ROUTES = {
    "/v1/chat/completions": chat.chat_completions,
    "/v1/embeddings": embeddings.embeddings,
    "/v1/responses": responses.create_response,
}


class GatewayApp(FastAPI):
    # Made by the lifespan; handlers find it through `services_of` (app/services.py). A typed attribute
    # of the application, not `app.state`: Starlette's State answers every read through `__getattr__`, a
    # Python call, on the path of every request.
    services: Services

    def __init__(self, settings: Settings, tracing: Tracing | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.tracing = tracing

    def build_middleware_stack(self) -> ASGIApp:
        # Outside Starlette's ServerErrorMiddleware, so even an unexpected 500 carries its X-Request-Id
        # and gets its access-log line; it meters the hot routes and FastAPI's alike when they end. The
        # path is checked before any route (hot or not) or auth sees it. Starlette offers no public place
        # outside that middleware (`add_middleware` layers go inside it); wrapping the application from
        # outside instead would make create_app return something other than the FastAPI app that
        # uvicorn's factory, the lifespan and the tests work with.
        stack: ASGIApp = RequestContextMiddleware(
            CanonicalPath(HotRoutes(super().build_middleware_stack(), HOT_ROUTES, gateway)), self._call_ended
        )
        # Outside that: a preflight is no call, and every answer, whoever made it, needs the headers.
        origins: tuple[str, ...] = self.settings.cors_origins
        if origins:
            stack = Cors(stack, origins)
        # Traced, the span wraps all of it; untraced, there is no layer at all.
        return stack if self.tracing is None else self.tracing.middleware(stack)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A request goes straight to the stack: FastAPI's __call__ asks its telemetry whether it is on and
        # Starlette's checks the stack is built, on every request, before either gets there.
        stack = self.middleware_stack
        if stack is None or scope["type"] != "http" or self.root_path:
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self
        await stack(scope, receive, send)

    def _call_ended(self, scope: Scope, call: CallRecord) -> None:
        meter_call(self.services.meter, scope, call)


def _configuration(settings: Settings | None) -> tuple[Settings, GatewayConfig]:
    try:
        settings = settings or load_settings()
        tokens.verify_vocabularies()
        return settings, load_gateway_config(settings.config_file)
    except (ConfigError, tokens.VocabularyError) as exc:
        # One clear line for the operator, not a traceback.
        print(f"llm-gateway: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _tracing(settings: Settings) -> Tracing | None:
    if settings.otel_endpoint is None:
        return None
    try:
        from app.tracing import Tracing
    except ImportError:
        print(
            "llm-gateway: OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed: "
            "pip install 'llm-gateway[otel]'",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    return Tracing(settings.otel_endpoint)


def _has_prompt_budgets(config: GatewayConfig) -> bool:
    return any(feature.max_prompt_tokens is not None for feature in config.features.values())


def _schema_check() -> SchemaCheck | None:
    try:
        return SchemaCheck()
    except RuntimeError as exc:  # an install without migrations/ cannot tell; it serves all the same
        log.warning("the database schema is not checked: %s", exc)
        return None


async def _schema_behind(schema: SchemaCheck | None, engine: AsyncEngine) -> bool:
    """Said once at start-up, for a database nobody migrated: until `llm-gateway migrate` runs, /readyz
    fails, and usage is spooled."""
    if schema is None:
        return False
    try:
        database = await asyncio.wait_for(database_revisions(engine), 5.0)
    except Exception:  # unreachable: /readyz says so, and the recorder spools until it is back
        return False
    behind = is_behind(database, schema.heads, schema.known)
    if behind:
        log.error(
            "database %s; until then /readyz answers 503 and usage is kept in the spool",
            BEHIND,
            extra={"database_revision": sorted(database), "needs": sorted(schema.heads)},
        )
    return behind


async def _make_guard(settings: Settings, config: GatewayConfig, engine: AsyncEngine, *, seed: bool) -> Guard:
    """Counters in Redis when several workers or replicas must share them, else in this process."""
    limiter: RateLimiter
    ledger: BudgetLedger
    client = None
    if settings.redis_url:
        client = redis_client(settings.redis_url, timeout_s=config.limits.redis_timeout_s)
        fail_open, timeout_s = config.limits.fail_open, config.limits.redis_timeout_s
        prefix = settings.redis_key_prefix
        limiter = RedisRateLimiter(client, fail_open=fail_open, timeout_s=timeout_s, prefix=prefix)
        ledger = RedisBudgetLedger(client, fail_open=fail_open, timeout_s=timeout_s, prefix=prefix)
    else:
        limiter, ledger = InProcessRateLimiter(), InProcessBudgetLedger()
    guard = Guard(limiter, ledger, reservation_ttl_s=settings.budget_reservation_ttl_s, shared_redis=client)
    if not seed:
        return guard
    try:
        await seed_spend(engine, ledger, guard.clock())
    except Exception as exc:  # start anyway: the database or Redis may come back; budgets count from now
        log.warning("could not load this period's spend for budgets", extra={"error": type(exc).__name__})
    return guard


def _live_config(settings: Settings, config: GatewayConfig, metrics: Metrics) -> LiveConfig:
    return LiveConfig(
        Policy(settings, config), PriceTable(config.prices, on_unknown=metrics.observe_unknown_model)
    )


def reload_config(services: Services) -> None:
    """SIGHUP: validate the file again and swap the policy and prices whole; work under way keeps the ones
    it started with (app.live_config). A bad file keeps the running configuration."""
    settings = services.settings
    try:
        fresh = load_gateway_config(settings.config_file)
    except ConfigError as exc:
        log.error("configuration not reloaded; keeping the running one", extra={"reason": str(exc)})
        return
    if _has_prompt_budgets(fresh):
        # In the background: the tokenizers may not be built yet (see the lifespan).
        threading.Thread(target=tokens.preload, name="tokenizer-preload", daemon=True).start()
    live = _live_config(settings, fresh, services.metrics)
    services.metrics.configure_labels(fresh, live.prices)
    services.config.current = live
    log.info("configuration reloaded")


def create_app(settings: Settings | None = None) -> GatewayApp:
    settings, config = _configuration(settings)
    configure_logging(settings.log_level)
    tracing = _tracing(settings)
    app_metrics = Metrics(settings.metrics_max_features)
    live = ConfigHolder(_live_config(settings, config, app_metrics))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        upstream = UpstreamClient(settings)
        upstream.tracing = tracing
        await upstream.start()
        engine = create_engine(settings.database_url, settings.data_dir)
        keys = KeyStore(engine)
        await keys.start()
        schema = _schema_check()
        behind = await _schema_behind(schema, engine)
        partitions = PartitionKeeper(engine, settings.usage_retention_days)
        partitions.start()
        # Without the tables there is no spend to load, only one more failure to log.
        guard = await _make_guard(settings, config, engine, seed=not behind)
        app_metrics.watch_limits(guard.stats)
        app_metrics.configure_labels(config, live.current.prices)
        app_metrics.labels.name_routes([*HOT_ROUTES, *(getattr(route, "path", "") for route in app.routes)])
        recorder: Recorder | None = None
        if _has_prompt_budgets(config):
            # Prompt budgets count every chat prompt of their features (in a thread): built now, so that
            # the first such request does not wait for one. Metering builds them when it first needs one.
            await asyncio.to_thread(tokens.preload)
        if settings.metering:
            recorder = Recorder(
                engine,
                settings.data_dir / "spool",
                max_queue=settings.recorder_max_queue,
                batch_size=settings.recorder_batch_size,
                flush_interval_s=settings.recorder_flush_interval_s,
                schema_behind_logged=behind,
            )
            await recorder.start()
            app_metrics.watch_recorder(recorder.stats)
        meter = Meter(recorder, live, app_metrics, guard)
        batch_meter: BatchMeter | None = None
        if settings.metering and settings.batch_metering:
            batch_meter = BatchMeter(
                engine,
                upstream,
                live,
                BatchSettings(
                    poll_initial_s=settings.batch_poll_initial_s,
                    poll_max_s=max(settings.batch_poll_max_s, settings.batch_poll_initial_s),
                    lease_s=settings.batch_lease_s,
                    max_file_bytes=settings.batch_max_file_bytes,
                ),
                guard,
                settings.data_dir / "batch-intents",
            )
            await batch_meter.start()
            app_metrics.watch_batches(batch_meter.stats)
        keepalives = KeepAlives(settings.sse_keepalive_s)
        keepalives.start()
        services = app.services = Services(
            settings=settings,
            config=live,
            metrics=app_metrics,
            token_secret=signing_key(settings),
            upstream=upstream,
            engine=engine,
            keys=keys,
            owners=OwnerStore(engine),
            schema=schema,
            guard=guard,
            meter=meter,
            batch_meter=batch_meter,
            keepalives=keepalives,
            client_watch=ClientWatch(),
            background=BackgroundResponses(),
        )
        reconciler: Reconciler | None = None
        if settings.openai_admin_key is not None:
            reconciler = Reconciler(settings, upstream, engine, app_metrics.registry)
            reconciler.start()
        shared_metrics = os.environ.get(WORKER_METRICS_DIR)
        if shared_metrics:
            app_metrics.share(Path(shared_metrics))
        publishing = asyncio.get_running_loop().create_task(app_metrics.publish_every())
        # Everything made at start-up (modules, tokenizer tables, settings) lives as long as the process:
        # out of the collector's sight, and fewer collections of the short-lived objects each request
        # makes (a request allocates hundreds of objects; the default threshold collects every 700).
        gc.collect()
        gc.freeze()
        gc.set_threshold(10_000, 20, 20)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            # Only the main thread of a process can take signals (not so in the tests' threaded server).
            loop.add_signal_handler(signal.SIGHUP, reload_config, services)
        try:
            yield
        finally:
            # uvicorn has let in-flight requests finish by now, so every event is queued, or is about
            # to be once a tokenizer is built.
            if reconciler is not None:
                await reconciler.close()
            await meter.drain(settings.shutdown_timeout_s)
            if batch_meter is not None:
                await batch_meter.close()
            if recorder is not None:
                await recorder.close(timeout_s=settings.shutdown_timeout_s)
            await keepalives.close()
            # After the recorder: its last counts are in the worker's final figures.
            publishing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publishing
            await guard.close()
            await partitions.close()
            await keys.close()
            await upstream.close()
            await engine.dispose()
            if tracing is not None:
                # Exports the last spans: up to the exporter's timeout when the collector is away.
                await asyncio.to_thread(tracing.shutdown)

    app = GatewayApp(
        settings,
        tracing,
        title="llm-gateway",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        # FastAPI's built-in OpenTelemetry checks the environment on every request (9% of the event loop
        # in the benchmark's profile); the gateway's own metrics are at /metrics.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(responses.router)
    app.include_router(models.router)
    app.include_router(usage.router)
    app.include_router(dashboard_router)
    app.include_router(admin.router)
    app.include_router(browser_tokens.router)
    # Last: it takes every /v1/* path the routers above do not.
    app.include_router(passthrough.router)
    return app
