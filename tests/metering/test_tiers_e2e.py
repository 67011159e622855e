"""Each call is priced at the service tier its answer reports, and its row says which price entry (and
which version of it) produced its cost."""

from __future__ import annotations

import uuid
from decimal import Decimal

import openai
import pytest

from app.metering.pricing import shipped_prices
from tests.db import wait_for_rows
from tests.fakes.openai_upstream import FakeOpenAI

USAGE = {"prompt_tokens": 1000, "completion_tokens": 200}
MESSAGES = [{"role": "user", "content": "Say hello"}]


def rid() -> str:
    return f"tier-{uuid.uuid4().hex}"


@pytest.mark.parametrize(
    ("asked", "reported", "key", "cost"),
    [
        # gpt-5-mini: $0.25 in / $2 out; Flex at half; Priority $0.45 / $3.60.
        (None, "default", "gpt-5-mini@standard", Decimal("0.00065")),
        ("auto", "default", "gpt-5-mini@standard", Decimal("0.00065")),
        ("flex", "flex", "gpt-5-mini@flex", Decimal("0.000325")),
        ("priority", "priority", "gpt-5-mini@priority", Decimal("0.00117")),
        ("scale", "scale", "gpt-5-mini@standard", Decimal("0.00065")),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_chat_priced_by_the_reported_tier(
    client: openai.OpenAI,
    fake: FakeOpenAI,
    database_url: str,
    asked: str | None,
    reported: str,
    key: str,
    cost: Decimal,
    stream: bool,
) -> None:
    request_id = rid()
    fake.reply("Hi!", usage=USAGE)
    extra = {} if asked is None else {"service_tier": asked}
    answer = client.chat.completions.create(
        model="gpt-5-mini",
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=stream,
        extra_headers={"X-Request-Id": request_id},
        **extra,  # type: ignore[arg-type]
    )
    if stream:
        for _ in answer:  # type: ignore[union-attr]
            pass
    (row,) = wait_for_rows(database_url, request_id)
    assert row["service_tier"] == reported
    assert row["price_key"] == key
    assert row["price_version"] == shipped_prices().as_of
    assert row["cost_usd"] == cost


def test_responses_priced_by_the_reported_tier(
    client: openai.OpenAI, fake: FakeOpenAI, database_url: str
) -> None:
    request_id = rid()
    client.responses.create(
        model="gpt-5-mini", input="hello", service_tier="flex", extra_headers={"X-Request-Id": request_id}
    )
    (row,) = wait_for_rows(database_url, request_id)
    assert (row["service_tier"], row["price_key"]) == ("flex", "gpt-5-mini@flex")
    standard = row["prompt_tokens"] * Decimal("0.25") + row["completion_tokens"] * 2
    assert row["cost_usd"] == standard / 2 / 1_000_000


def test_a_tier_without_rates_lands_unpriced(
    client: openai.OpenAI, fake: FakeOpenAI, database_url: str
) -> None:
    request_id = rid()
    fake.reply("Hi!", usage=USAGE)
    client.chat.completions.create(
        model="gpt-5-nano",
        messages=MESSAGES,  # type: ignore[arg-type]
        service_tier="priority",
        extra_headers={"X-Request-Id": request_id},
    )
    (row,) = wait_for_rows(database_url, request_id)
    assert row["service_tier"] == "priority"
    assert (row["cost_usd"], row["price_key"], row["price_version"]) == (None, None, None)


def test_audio_tokens_priced_at_audio_rates(
    client: openai.OpenAI, fake: FakeOpenAI, database_url: str
) -> None:
    request_id = rid()
    fake.reply(
        "Hi!",
        usage={
            "prompt_tokens": 1000,
            "completion_tokens": 500,
            "prompt_tokens_details": {"audio_tokens": 600},
            "completion_tokens_details": {"audio_tokens": 400},
        },
    )
    client.chat.completions.create(
        model="gpt-4o-audio-preview",
        messages=MESSAGES,  # type: ignore[arg-type]
        extra_headers={"X-Request-Id": request_id},
    )
    (row,) = wait_for_rows(database_url, request_id)
    assert (row["audio_prompt_tokens"], row["audio_completion_tokens"]) == (600, 400)
    # Text $2.50 in / $10 out, audio $40 in / $80 out.
    expected = (400 * Decimal("2.5") + 600 * 40 + 100 * 10 + 400 * 80) / 1_000_000
    assert row["cost_usd"] == expected
