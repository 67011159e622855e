"""GET /metrics in the Prometheus text format, for the whole server (every worker: app/metering/metrics.py).

With GATEWAY_METRICS_KEY set, a scrape needs `Authorization: Bearer <metrics key>`: the metrics name
features and models. The master key is accepted too, as it may read all usage anyway; gateway keys are not.
"""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from app.access.auth import bearer_key
from app.config import Settings
from app.errors import GatewayError
from app.services import services_of

router = APIRouter()


def _check_scrape(request: Request, settings: Settings) -> None:
    if settings.metrics_key is None:
        return
    presented = bearer_key(request.headers.get("authorization")).encode()
    # Both compared, in constant time: neither key must be guessable from response timing.
    metrics_ok = hmac.compare_digest(presented, settings.metrics_key.get_secret_value().encode())
    master_ok = hmac.compare_digest(presented, settings.master_key.get_secret_value().encode())
    if not (metrics_ok or master_ok):
        raise GatewayError(
            401,
            "Incorrect key for /metrics: send the metrics key (GATEWAY_METRICS_KEY) as a Bearer token.",
            code="invalid_api_key",
            headers={"www-authenticate": "Bearer"},
        )


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    services = services_of(request)
    _check_scrape(request, services.settings)
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)
