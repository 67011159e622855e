"""The metered endpoints, as data: the path a client calls (and a usage row names), the dialect its
answers speak, and what the limits apply to it. Routes, limits, metering and tracing look an endpoint up
here instead of comparing path strings.

Three are routes of their own (chat completions, the Responses API, embeddings). The others are passed
through (app/routes/passthrough.py) and metered when their JSON answer reports usage; a path not listed
here that does so is metered too, under its own path, read as `JSON`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from app.wire import openai
from app.wire.dialect import Dialect

D = TypeVar("D", bound=Dialect, covariant=True)


@dataclass(frozen=True, slots=True)
class MeteredEndpoint(Generic[D]):
    path: str
    dialect: D
    # A feature's prompt budget (max_prompt_tokens) trims or refuses the request's messages.
    prompt_budget: bool = False
    # It generates output tokens, so admission reserves the worst case of them (embeddings do not).
    output_tokens: bool = True
    # OpenTelemetry's gen_ai.operation.name; None: the path names the span.
    operation: str | None = None
    # A passed-through endpoint whose worst case admission holds once its body is read, and the rule
    # that bounds it (app/limits/estimate.py): "completion" (the output cap, times n or best_of), "image"
    # (the output tokens of the image asked for), "image_edit" (that, and the input images) or
    # "transcription" (the audio the file can hold, and the output cap). None: it holds nothing up front.
    held_output: str | None = None
    # Its request is a multipart/form-data upload, not JSON: the hold reads the form's fields and the
    # size of its files (app/proxy/form.py).
    form: bool = False

    @property
    def upstream_path(self) -> str:
        """The path under the upstream's base URL, which ends with its version (`.../v1`)."""
        return self.path.removeprefix("/v1")


CHAT = MeteredEndpoint("/v1/chat/completions", openai.CHAT, prompt_budget=True, operation="chat")
# The Responses API is a chat turn in OpenTelemetry's conventions.
RESPONSES = MeteredEndpoint("/v1/responses", openai.RESPONSES, operation="chat")
EMBEDDINGS = MeteredEndpoint("/v1/embeddings", openai.JSON, output_tokens=False, operation="embeddings")

_PASSED_THROUGH = (
    MeteredEndpoint("/v1/completions", openai.JSON, operation="text_completion", held_output="completion"),
    MeteredEndpoint("/v1/audio/transcriptions", openai.JSON, held_output="transcription", form=True),
    MeteredEndpoint("/v1/audio/translations", openai.JSON, held_output="transcription", form=True),
    MeteredEndpoint("/v1/images/generations", openai.JSON, held_output="image"),
    MeteredEndpoint("/v1/images/edits", openai.JSON, held_output="image_edit", form=True),
    MeteredEndpoint("/v1/images/variations", openai.JSON, held_output="image_edit", form=True),
)

_BY_PATH: dict[str, MeteredEndpoint[Dialect]] = {
    endpoint.path: endpoint for endpoint in (CHAT, RESPONSES, EMBEDDINGS, *_PASSED_THROUGH)
}


def metered(path: str) -> MeteredEndpoint[Dialect]:
    """The endpoint registered at `path`, or one read as plain JSON answers under that path."""
    return _BY_PATH.get(path) or MeteredEndpoint(path, openai.JSON)


def holding(path: str) -> MeteredEndpoint[Dialect] | None:
    """The passed-through endpoint at `path` if it holds a worst case (see MeteredEndpoint), else None."""
    endpoint = _BY_PATH.get(path)
    return endpoint if endpoint is not None and endpoint.held_output is not None else None


def operation(path: str | None) -> str | None:
    endpoint = _BY_PATH.get(path) if path is not None else None
    return endpoint.operation if endpoint is not None else None
