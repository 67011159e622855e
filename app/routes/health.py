"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from app.db.engine import ping
from app.db.migrate import BEHIND, SchemaCheck
from app.routes.deps import SettingsDep
from app.services import services_of

router = APIRouter()

_READY_TIMEOUT_S = 2.0


@router.get("/healthz")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/readyz")
async def readyz(request: Request, settings: SettingsDep) -> Response:
    checks: dict[str, str] = {}
    services = services_of(request)
    engine = services.engine
    try:
        await asyncio.wait_for(ping(engine), _READY_TIMEOUT_S)
        checks["database"] = "ok"
    except Exception as exc:  # any failure to reach the database means not ready, whatever its kind
        checks["database"] = f"unreachable: {type(exc).__name__}"
    schema: SchemaCheck | None = services.schema
    if checks["database"] == "ok" and schema is not None:
        try:
            behind = await asyncio.wait_for(schema.behind(engine), _READY_TIMEOUT_S)
            checks["schema"] = BEHIND if behind else "ok"
        except Exception as exc:  # as above: not ready
            checks["schema"] = f"unknown: {type(exc).__name__}"
    checks["upstream"] = "ok" if settings.upstream_configured else "OPENAI_API_KEY is not set"
    ready = all(value == "ok" for value in checks.values())
    return Response(
        orjson.dumps({"status": "ready" if ready else "not ready", "checks": checks}),
        status_code=200 if ready else 503,
        media_type="application/json",
    )
