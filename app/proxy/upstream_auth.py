"""How an upstream learns who is calling: the gateway's key for it, in the header that upstream reads
(`Authorization: Bearer`, or Azure OpenAI's `api-key`), and the `api-version` query parameter Azure
OpenAI takes. Both are the operator's to set (GATEWAY_CONFIG), never the client's: the client's own
`authorization` and `api-key` headers are dropped with the other headers that never go upstream, and so
is any `api-version` in its query. The headers are made once per upstream when the configuration loads;
a request merges them."""

from __future__ import annotations

from urllib.parse import unquote_plus

from app.config_file import AuthStyle

API_VERSION = "api-version"


def auth_headers(auth: AuthStyle, api_key: str | None) -> dict[str, str]:
    """The headers that carry `api_key` to an upstream whose style is `auth`."""
    if api_key is None:
        return {}
    if auth == "api-key":
        return {"api-key": api_key}
    return {"authorization": f"Bearer {api_key}"}


def with_api_version(url: str, api_version: str | None) -> str:
    """`url` with no `api-version` parameter but the upstream's own (if it has one) at the end. Any other
    parameter keeps its place and spelling."""
    base, _, query = url.partition("?")
    params = [param for param in query.split("&") if param and not _names_api_version(param)]
    if api_version is not None:
        params.append(f"{API_VERSION}={api_version}")
    return f"{base}?{'&'.join(params)}" if params else base


def _names_api_version(param: str) -> bool:
    # Read as a server would: percent-decoded, '+' a space, case-blind (ASP.NET matches query names so),
    # so that `API%2DVersion=` cannot pass where `api-version=` would not.
    return unquote_plus(param.partition("=")[0]).strip().lower() == API_VERSION
