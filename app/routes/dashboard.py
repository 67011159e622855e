"""GET /dashboard: the cost dashboard, a static page and its script and stylesheet, shipped in the package.

The page holds no data and no key: it asks for a key with the `reports` scope (or the master key), keeps it
in the tab's sessionStorage and sends it in an Authorization header to GET /v1/usage/summary, which is
where the scope is enforced. Nothing is fetched from elsewhere (the gateway may run with no internet), and
the Content-Security-Policy lets the page load only its own files and talk only to its own origin.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from starlette.responses import Response

from app.errors import GatewayError

router = APIRouter()

_TYPES = {
    "dashboard.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
_HEADERS = {
    # form-action 'none': the key's form is handled by the script and can never be submitted into a URL.
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


@cache
def _asset(name: str) -> bytes:
    return (resources.files("app") / "static" / name).read_bytes()


def _serve(name: str) -> Response:
    return Response(_asset(name), media_type=_TYPES[name], headers=_HEADERS)


@router.get("/dashboard")
async def dashboard() -> Response:
    return _serve("dashboard.html")


@router.get("/dashboard/{name}")
async def dashboard_asset(name: str) -> Response:
    if name not in _TYPES or name == "dashboard.html":
        raise GatewayError(404, f"No dashboard file '{name[:64]}'.", code="not_found")
    return _serve(name)
