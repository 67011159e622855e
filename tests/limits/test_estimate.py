"""The prompt estimate budgets reserve before a call: never short of what the tokenizer counts for the
usual request, whatever its script, and an image named by URL counts as the most an image is billed."""

# Text in other scripts is the point here: its look-alike letters are meant.
# ruff: noqa: RUF001

from __future__ import annotations

from typing import Any

import orjson
import pytest

from app.config_file import GatewayConfig
from app.limits import estimate
from app.metering import tokens

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog, again and again. " * 40,
    "chinese": "敏捷的棕色狐狸跳过了懒狗，一次又一次地跳过去。" * 40,
    "japanese": "素早い茶色の狐が怠け者の犬を飛び越える。何度も何度も。" * 40,
    "russian": "Быстрая коричневая лиса перепрыгивает через ленивую собаку. " * 40,
    "greek": "Η γρήγορη καφέ αλεπού πηδά πάνω από τον τεμπέλη σκύλο. " * 40,
    "code": "def f(x: int) -> int:\n    return {'a': x ** 2}[\"a\"]  # ok\n" * 40,
    "minified": "function(a,b){return a.map(x=>x*2).filter(y=>y>b)};" * 40,
    "numbers": "3.14159, 2.71828, 1.41421, 1234567890; " * 40,
    "json": '{"type":"object","properties":{"a":{"type":"string","enum":["x","y"]}},"required":["a"]}' * 20,
}


def _chat(content: Any) -> bytes:
    return orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]})


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_the_estimate_is_never_below_the_tokenizer(name: str) -> None:
    text = TEXTS[name]
    counted = tokens.count_text("gpt-4o-mini", text)
    # As a client sends it: UTF-8 as it is, or every character outside ASCII escaped.
    for raw in (
        _chat(text),
        orjson.dumps({"messages": [{"content": text}]}).decode().encode("ascii", "backslashreplace"),
    ):
        assert estimate.prompt_tokens(raw) >= counted, name
    # Still an estimate, not a multiple: within three times the count.
    assert estimate.prompt_tokens(_chat(text)) <= 3 * counted


def test_an_image_by_url_counts_as_the_most_an_image_costs() -> None:
    chat = _chat(
        [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/b.png", "detail": "high"}},
        ]
    )
    assert estimate.prompt_tokens(chat) >= 2 * estimate.IMAGE_TOKENS
    responses = orjson.dumps(
        {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]}
    )
    assert estimate.prompt_tokens(responses) >= estimate.IMAGE_TOKENS
    # A text that only mentions images is text.
    assert estimate.prompt_tokens(_chat("an image_url is a field")) < 100


def test_image_generation_holds_the_dearest_image_unless_told_less() -> None:
    config = GatewayConfig()

    def output(**body: Any) -> int:
        return estimate.passthrough_output("image", body, config, None, "gpt-image-1")

    assert output(prompt="a cat") == 6240
    assert output(prompt="a cat", quality="auto", size="auto", n=2) == 2 * 6240
    assert output(prompt="a cat", quality="low", size="1024x1024") == 272
    assert output(prompt="a cat", quality="medium", size="1536x1024", n=3) == 3 * 1584


def test_legacy_completions_hold_every_completion_best_of_makes() -> None:
    config = GatewayConfig()

    def output(**body: Any) -> int:
        return estimate.passthrough_output("completion", body, config, None, "gpt-3.5-turbo-instruct")

    assert output(prompt="x", max_tokens=100) == 100
    assert output(prompt="x", max_tokens=100, n=2, best_of=5) == 500
    assert output(prompt="x", max_tokens=100, n=3) == 300
    assert output(prompt="x") == config.limits.default_max_output_tokens
