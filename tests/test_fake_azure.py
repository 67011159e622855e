"""The fake upstream as Azure OpenAI (FakeOpenAI(auth="api-key", api_version=...)), checked against the
official openai SDK used directly: the key in an `api-key` header, the api-version in the query."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.fakes.openai_payloads import AZURE_ACCESS_DENIED
from tests.fakes.openai_upstream import FakeOpenAI

KEY = "azure-fake-key-0123456789"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def azure() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key=KEY, auth="api-key", api_version="preview") as server:
        yield server


def _sdk(azure: FakeOpenAI, headers: dict[str, str], query: dict[str, str]) -> openai.OpenAI:
    # The SDK always sends `Authorization: Bearer <api_key>`: Azure's check is on `api-key` alone.
    return openai.OpenAI(
        base_url=azure.base_url, api_key=KEY, default_headers=headers, default_query=query, max_retries=0
    )


def test_the_key_in_api_key_and_the_version_in_the_query_are_served(azure: FakeOpenAI) -> None:
    azure.reset()
    with _sdk(azure, {"api-key": KEY}, {"api-version": "preview"}) as sdk:
        completion = sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert completion.choices[0].message.content
    (request,) = azure.requests
    assert request.query_string == "api-version=preview"
    assert request.headers["api-key"] == KEY


@pytest.mark.parametrize("headers", [{}, {"api-key": "sk-wrong"}])
def test_no_or_a_wrong_api_key_is_401_even_with_the_key_as_bearer(
    azure: FakeOpenAI, headers: dict[str, str]
) -> None:
    with (
        _sdk(azure, headers, {"api-version": "preview"}) as sdk,
        pytest.raises(openai.AuthenticationError) as caught,
    ):
        sdk.models.list()
    assert caught.value.message.endswith(AZURE_ACCESS_DENIED)
    assert caught.value.code == "401"


@pytest.mark.parametrize("query", [{}, {"api-version": "2024-02-01"}])
def test_another_or_no_api_version_is_400(azure: FakeOpenAI, query: dict[str, str]) -> None:
    with _sdk(azure, {"api-key": KEY}, query) as sdk, pytest.raises(openai.BadRequestError) as caught:
        sdk.models.list()
    assert caught.value.message.endswith("API version not supported")
    assert caught.value.code == "BadRequest"
