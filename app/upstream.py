"""The one upstream HTTP client per process, and the retrying call through it.

aiohttp rather than httpx (or AsyncOpenAI on httpx): measured on this 2-core machine kind, a bare
pass-through relaying with aiohttp did ~2,860 req/s on one core, the same with httpx ~350 req/s
(ARCHITECTURE.md, pitfall 3). The gateway relays bytes, so it needs no SDK models here.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable, Mapping
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDictProxy

from app.call import CallRecord
from app.config import Settings
from app.policy import UpstreamTarget
from app.retry_policy import RetryPolicy, is_retryable_status

# Headers of the client's request that never go upstream: the client's gateway key, the gateway's
# own attribution headers, hop-by-hop headers, and identity headers that belong to the client's
# OpenAI account rather than the gateway's key.
_DROP_REQUEST = frozenset(
    {
        "authorization",
        "host",
        "content-length",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "cookie",
        "accept-encoding",
        "x-feature",
        "x-user-id",
        "x-request-id",
        "openai-organization",
        "openai-project",
    }
)
# Upstream response headers a client's SDK reads; everything else (cookies, CDN headers, framing)
# stays here. The upstream's x-request-id is renamed: ours is the one the client sees.
_RELAY_RESPONSE = frozenset(
    {
        "retry-after",
        "retry-after-ms",
        "openai-processing-ms",
        "openai-version",
        "openai-model",
        "openai-poll-after-ms",
    }
)


class UpstreamUnavailable(Exception):
    """No response after every attempt: `timeout` (→ 504) or `connect` (→ 502)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    headers: CIMultiDictProxy[str]
    # The whole body, or for an open stream the first bytes (read inside the attempt, so a failure
    # before them is retried while nothing has reached the client yet).
    body: bytes
    stream: aiohttp.ClientResponse | None = None


def upstream_request_headers(client_headers: Mapping[str, str]) -> dict[str, str]:
    return {
        name: value
        for name, value in client_headers.items()
        if name not in _DROP_REQUEST and not name.startswith("x-gateway-")
    }


def is_sse(response: aiohttp.ClientResponse) -> bool:
    return response.status < 300 and response.headers.get("content-type", "").startswith("text/event-stream")


def never_open(_: aiohttp.ClientResponse) -> bool:
    """For calls answered with one JSON body: read whole, under the total request timeout."""
    return False


def relay_response_headers(upstream: Mapping[str, str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in upstream.items():
        lower = name.lower()
        if lower in _RELAY_RESPONSE or lower.startswith("x-ratelimit-"):
            headers[lower] = value
        elif lower == "x-request-id":
            headers["x-upstream-request-id"] = value
    return headers


class UpstreamClient:
    def __init__(self, settings: Settings) -> None:
        self.policy = RetryPolicy(settings)
        self.suppress_client_retries = settings.suppress_client_retries and settings.max_attempts > 1
        self._json_timeout = aiohttp.ClientTimeout(
            total=settings.request_timeout_s, sock_connect=settings.connect_timeout_s
        )
        # A stream may last as long as the model writes (or the file is long); only the gap between reads
        # is bounded.
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None,
            connect=settings.request_timeout_s,
            sock_connect=settings.connect_timeout_s,
            sock_read=settings.stream_read_timeout_s,
        )
        self._max_connections = settings.upstream_max_connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections, limit_per_host=0, keepalive_timeout=30, ttl_dns_cache=300
        )
        # The gateway relays upstream bytes; cookies would leak one client's state into another's calls.
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=True
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def relay_headers(self, response: UpstreamResponse) -> dict[str, str]:
        return relay_response_headers(response.headers)

    def error_headers(self, response: UpstreamResponse) -> dict[str, str]:
        """Headers for an upstream error relayed to the client after the gateway's retries."""
        headers = relay_response_headers(response.headers)
        if self.suppress_client_retries and is_retryable_status(response.status, response.headers):
            # The gateway already retried; the SDK's own retries would multiply the attempts.
            headers["x-should-retry"] = "false"
        return headers

    async def send(
        self,
        target: UpstreamTarget,
        method: str,
        path: str,
        *,
        body: bytes | AsyncIterable[bytes],
        headers: Mapping[str, str],
        call: CallRecord,
        keep_open: Callable[[aiohttp.ClientResponse], bool] = is_sse,
        replayable: bool = True,
    ) -> UpstreamResponse:
        """One call with retries. A response for which `keep_open` is true comes back open, with its first
        bytes already read; any other is read whole. When the request is not `replayable` (a streamed
        upload, a non-idempotent passthrough), only failures before a connection existed are retried:
        until then not a byte of the body has left."""
        assert self._session is not None, "UpstreamClient.start() was not awaited"
        session = self._session
        url = target.base_url + path
        headers = dict(headers)
        if target.api_key is not None:
            headers["authorization"] = f"Bearer {target.api_key}"
        timeout = self._json_timeout if keep_open is never_open else self._stream_timeout

        async def attempt() -> UpstreamResponse:
            call.attempts += 1
            response = await session.request(method, url, data=body, headers=headers, timeout=timeout)
            try:
                if keep_open(response):
                    first = await response.content.readany()
                    if not first and is_sse(response):
                        raise aiohttp.ClientPayloadError("upstream closed the stream before its first byte")
                    return UpstreamResponse(response.status, response.headers, first, response)
                data = await response.read()
            except BaseException:
                response.close()
                raise
            response.release()
            return UpstreamResponse(response.status, response.headers, data)

        try:
            result = await self.policy.run(attempt, replayable=replayable)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamUnavailable(
                "timeout", f"upstream timed out after {call.attempts} attempt(s)"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailable(
                "connect", f"upstream unreachable after {call.attempts} attempt(s): {type(exc).__name__}"
            ) from exc
        return result
