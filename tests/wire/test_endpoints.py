"""The metered endpoints as data: what routes, limits, metering and tracing read instead of paths."""

from __future__ import annotations

from app.main import HOT_ROUTES
from app.wire import endpoints, openai


def test_each_endpoint_says_what_applies_to_it() -> None:
    assert endpoints.CHAT.prompt_budget and endpoints.CHAT.output_tokens
    assert not endpoints.RESPONSES.prompt_budget and endpoints.RESPONSES.output_tokens
    assert not endpoints.EMBEDDINGS.prompt_budget and not endpoints.EMBEDDINGS.output_tokens
    assert endpoints.CHAT.dialect is openai.CHAT
    assert endpoints.RESPONSES.dialect is openai.RESPONSES
    assert endpoints.CHAT.upstream_path == "/chat/completions"


def test_every_hot_route_is_a_registered_endpoint() -> None:
    for path in HOT_ROUTES:
        assert endpoints.metered(path).path == path
        assert endpoints.metered(path).operation is not None


def test_passed_through_endpoints_are_entries_and_others_read_as_json() -> None:
    completions = endpoints.metered("/v1/completions")
    assert completions.operation == "text_completion" and completions.dialect is openai.JSON
    transcriptions = endpoints.metered("/v1/audio/transcriptions")
    assert transcriptions.path == "/v1/audio/transcriptions" and transcriptions.operation is None
    unknown = endpoints.metered("/v1/some/new/thing")
    assert unknown.path == "/v1/some/new/thing" and unknown.dialect is openai.JSON
    assert not unknown.prompt_budget


def test_operations_by_path() -> None:
    assert endpoints.operation("/v1/chat/completions") == "chat"
    assert endpoints.operation("/v1/responses") == "chat"
    assert endpoints.operation("/v1/embeddings") == "embeddings"
    assert endpoints.operation("/v1/files") is None
    assert endpoints.operation(None) is None


def test_the_passed_through_endpoints_that_hold_a_worst_case() -> None:
    def rule(path: str) -> tuple[str | None, bool] | None:
        endpoint = endpoints.holding(path)
        return None if endpoint is None else (endpoint.held_output, endpoint.form)

    assert rule("/v1/completions") == ("completion", False)
    assert rule("/v1/images/generations") == ("image", False)
    # Multipart uploads hold what their form says; unlisted paths hold nothing up front.
    assert rule("/v1/images/edits") == rule("/v1/images/variations") == ("image_edit", True)
    assert rule("/v1/audio/transcriptions") == rule("/v1/audio/translations") == ("transcription", True)
    assert rule("/v1/files") is None
    assert rule("/v1/embeddings") is None
