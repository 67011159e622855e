"""A huge event relayed without the event loop held for its whole length: its text is parsed only if the
stream ends without usage, and still counted then, in its place among the other deltas."""

from __future__ import annotations

import openai
import pytest

from app.metering import tokens
from tests.conftest import sdk_client
from tests.db import wait_for_rows
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import ThreadedGateway

MESSAGES = [{"role": "user", "content": "Say a lot."}]


def test_huge_events_of_a_stream_broken_off_before_its_usage_count_in_their_place(
    gateway: ThreadedGateway, fake: FakeOpenAI, database_url: str
) -> None:
    """Two events past the relay's 64 KiB of unparsed chunks, each followed by more than 64 KiB of small
    ones, then the upstream breaks off: every delta counts, in order (the count of the joined text
    changes with the order of its pieces)."""
    small = [f"s{i} " for i in range(400)]
    # Each big one ends with a quote that makes "'s" one token with the small one after it: the count
    # changes when the pieces move.
    chunks = ["Start:", "big one " * 20_000 + "'", *small, "second big " * 20_000 + "'", *small[:5]]
    fake.reply(chunks=chunks)
    fake.drop_mid_stream(after_chunks=len(chunks) + 1)  # the role chunk, then all of these
    relayed: list[str] = []
    with sdk_client(gateway.base_url, timeout=30) as sdk:
        stream = sdk.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"X-Request-Id": "big-event-estimate"},
        )
        with pytest.raises(openai.APIError):
            for chunk in stream:
                relayed.extend(choice.delta.content or "" for choice in chunk.choices)
    assert relayed[1:] == chunks
    (row,) = wait_for_rows(database_url, "big-event-estimate")
    assert row["usage_source"] == "estimated"
    assert row["completion_tokens"] == tokens.count_text("gpt-4o", "".join(relayed))
