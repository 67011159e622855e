"""Where a call can go: an upstream (its base URL, its key and how that key is sent) and, in order, the
models to try there. The policy (`app/limits/policy.py`) makes them from the settings and GATEWAY_CONFIG;
the upstream client sends to them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from app.config_file import AuthStyle
from app.proxy.upstream_auth import auth_headers, with_api_version


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    name: str
    base_url: str
    api_key: str | None
    auth: AuthStyle = "bearer"
    api_version: str | None = None
    # Named in GATEWAY_CONFIG, rather than by OPENAI_BASE_URL/OPENAI_API_KEY: what an operator must fix.
    configured: bool = False
    # What carries the key, and the query a path without one gets: made here once (the policy is built at
    # start-up and on SIGHUP), not per call.
    headers: Mapping[str, str] = field(init=False, repr=False, compare=False)
    query: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", auth_headers(self.auth, self.api_key))
        object.__setattr__(self, "query", with_api_version("", self.api_version))


@dataclass(frozen=True, slots=True)
class Candidate:
    """One model to try, in order: the requested one first, then its fallbacks."""

    model: str
    target: UpstreamTarget
