"""OpenTelemetry traces over OTLP/HTTP, when OTEL_EXPORTER_OTLP_ENDPOINT is set (the `otel` extra).

Imported only then: unset, neither this module nor the SDK is loaded, no middleware is added, and the
request path's only sign of tracing is one `is None` test per upstream call.

Each request is a SERVER span, named and described after the OpenTelemetry GenAI semantic conventions
for the metered routes (`chat gpt-4o-mini`, `gen_ai.request.model`, `gen_ai.response.model`,
`gen_ai.usage.input_tokens`…), with the gateway's own attribution (feature, user, key id, attempts,
cost) under `gateway.*`. It ends when the response has ended, however it ended (a stream finished, broken
off by the upstream, or abandoned by the client). Each upstream attempt is a CLIENT span under it, until
its answer's head (and a stream's first bytes) or its failure. An incoming W3C `traceparent` is
continued, and each attempt sends the upstream a `traceparent` naming its own span.

Prompts, completions, headers and keys are never put on a span. Only `traceparent`/`tracestate` are
read and written (the W3C trace-context propagator alone): the gateway adds no `baggage` of its own.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Receive, Scope, Send

from app.call.record import STATE_KEY, CallRecord
from app.db.events import COST_EXPONENT
from app.wire import endpoints


class _Answered(Protocol):
    """What a span reads of an upstream attempt's answer: its status. Named here rather than imported, so
    the upstream client, which calls the tracer, is the only one of the two that knows the other."""

    @property
    def status(self) -> int: ...


_Answer = TypeVar("_Answer", bound=_Answered)

_PROPAGATOR = TraceContextTextMapPropagator()
_COST_UNIT_USD = 10.0**COST_EXPONENT


class _AsgiHeaders(Getter[list[tuple[bytes, bytes]]]):
    def get(self, carrier: list[tuple[bytes, bytes]], key: str) -> list[str] | None:
        name = key.encode()
        values = [value.decode("latin-1") for header, value in carrier if header == name]
        return values or None

    def keys(self, carrier: list[tuple[bytes, bytes]]) -> list[str]:
        return [header.decode("latin-1") for header, _ in carrier]


_HEADERS = _AsgiHeaders()


class Tracing:
    """One per worker process: its own provider and export thread (made in the worker, after the spawn)."""

    def __init__(self, endpoint: str) -> None:
        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are honoured; the gateway names itself otherwise.
        resource = Resource.create(
            {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": "llm-gateway"}
        )
        self._provider = TracerProvider(resource=resource)
        # The spec's rule for the signal-generic variable: the traces path is appended to it.
        exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
        # Spans are exported from a thread of the SDK's, in batches (OTEL_BSP_* tune them): the request
        # path only queues a finished span, and a slow or absent collector costs dropped spans, not time.
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer("llm-gateway")

    def middleware(self, app: ASGIApp) -> ASGIApp:
        return _TracedRequests(app, self._tracer)

    def attempts(
        self,
        attempt: Callable[[], Awaitable[_Answer]],
        headers: MutableMapping[str, str],
        method: str,
        url: str,
        call: CallRecord,
    ) -> Callable[[], Awaitable[_Answer]]:
        """`attempt`, each run of it a CLIENT span; `headers`, the ones it sends, carry that span's
        traceparent."""
        tracer = self._tracer

        async def traced() -> _Answer:
            span = tracer.start_span(
                f"{method} upstream",
                kind=SpanKind.CLIENT,
                attributes={"http.request.method": method, "url.full": _without_credentials(url)},
            )
            with trace.use_span(
                span, end_on_exit=True, record_exception=False, set_status_on_exception=False
            ):
                headers.pop("tracestate", None)
                _PROPAGATOR.inject(headers)
                try:
                    result = await attempt()
                except BaseException as exc:
                    span.set_attribute("gateway.attempt", call.outcome.attempts)
                    span.set_attribute("error.type", type(exc).__name__)
                    span.set_status(Status(StatusCode.ERROR))
                    raise
                span.set_attribute("gateway.attempt", call.outcome.attempts)
                span.set_attribute("http.response.status_code", result.status)
                if result.status >= 400:
                    span.set_attribute("error.type", str(result.status))
                    span.set_status(Status(StatusCode.ERROR))
                return result

        return traced

    def shutdown(self) -> None:
        """Export what is left (bounded by the exporter's timeout), then stop the export thread."""
        self._provider.shutdown()


class _TracedRequests:
    """Outermost, around the request context: the span covers the whole response, metering included."""

    def __init__(self, app: ASGIApp, tracer: trace.Tracer) -> None:
        self.app = app
        self._tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        parent = _PROPAGATOR.extract(scope["headers"], getter=_HEADERS)
        span = self._tracer.start_span(
            f"{scope['method']} {scope['path']}", context=parent, kind=SpanKind.SERVER
        )
        # The request context puts the call's record here; the same dict is seen once the app returns.
        state = scope.setdefault("state", {})
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        try:
            await self.app(scope, receive, send)
        finally:
            otel_context.detach(token)
            call = state.get(STATE_KEY)
            # An unsampled span (OTEL_TRACES_SAMPLER) records nothing: no attributes are gathered for it.
            if not isinstance(call, CallRecord) or not span.is_recording():
                span.end()
            elif (pending := call.outcome.pending_metering) is None or pending.done():
                _finish(span, call)
            else:
                # Counted once a tokenizer is built (a moment later): the span carries the count, and
                # still ends when the response did.
                ended = time.time_ns()
                pending.add_done_callback(lambda _: _finish(span, call, ended))


def _finish(span: Span, call: CallRecord, end_ns: int | None = None) -> None:
    _describe(span, call)
    span.end(end_ns)


def _describe(span: Span, call: CallRecord) -> None:
    admitted, outcome = call.admitted, call.outcome
    attributes: dict[str, Any] = {
        "http.request.method": call.method,
        "http.response.status_code": outcome.status_code,
        "gateway.request_id": call.request_id,
        "gateway.attempts": outcome.attempts,
    }
    route = call.route or admitted.endpoint
    if route is not None:
        attributes["http.route"] = route
    endpoint = admitted.endpoint
    operation = endpoints.operation(endpoint)
    if endpoint is not None:
        attributes["gen_ai.operation.name"] = operation or endpoint
        attributes["gen_ai.system"] = attributes["gen_ai.provider.name"] = "openai"
        attributes["gateway.stream"] = admitted.stream
        span.update_name(f"{operation or endpoint} {admitted.model}" if admitted.model else endpoint)
    elif route is not None:
        span.update_name(f"{call.method} {route}")
    answered_by = outcome.upstream_model or outcome.routed_model
    usage = outcome.metered_usage
    _put(
        attributes,
        (
            ("gen_ai.request.model", admitted.model),
            ("gen_ai.response.model", answered_by),
            ("gen_ai.usage.input_tokens", None if usage is None else usage.prompt_tokens),
            ("gen_ai.usage.output_tokens", None if usage is None else usage.completion_tokens),
            ("gateway.usage.cached_tokens", None if usage is None else usage.cached_tokens),
            ("gateway.usage.reasoning_tokens", None if usage is None else usage.reasoning_tokens),
            (
                "gateway.cost_usd",
                None if outcome.cost_units is None else outcome.cost_units * _COST_UNIT_USD,
            ),
            ("gateway.feature", admitted.feature),
            ("gateway.user_id", admitted.user_id),
            ("gateway.api_key_id", admitted.api_key_id),
            ("gateway.client_request_id", call.client_request_id),
            ("gateway.client_disconnected", outcome.client_disconnected or None),
            ("error.type", outcome.error_type),
        ),
    )
    span.set_attributes(attributes)
    if outcome.status_code >= 500 or (outcome.error_type is not None and admitted.endpoint is not None):
        span.set_status(Status(StatusCode.ERROR))


def _without_credentials(url: str) -> str:
    """An OPENAI_BASE_URL may carry user:password@; the conventions have it redacted on spans."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="REDACTED:REDACTED@" + parts.netloc.rpartition("@")[2]))


def _put(attributes: dict[str, Any], pairs: Iterable[tuple[str, Any]]) -> None:
    # An attribute with no value is left out rather than sent empty.
    attributes.update((name, value) for name, value in pairs if value is not None)
