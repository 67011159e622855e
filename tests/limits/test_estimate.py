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


def test_a_transcription_holds_the_longest_audio_its_file_can_carry() -> None:
    config = GatewayConfig()

    def worst(size: int, model: str = "gpt-4o-transcribe", **fields: str) -> estimate.WorstCase:
        return estimate.upload_worst_case("transcription", fields, 1, size, config, None, model)

    # One second of 6 kb/s audio per 750 bytes, 17 tokens a second; the transcript at the default cap.
    assert worst(750) == (17, config.limits.default_max_output_tokens, 17, 0)
    assert worst(751).audio_prompt == 34
    # A 25 MB file would last hours: the model's context window bounds what it takes.
    assert worst(25 * 1024 * 1024).audio_prompt == 16_000
    assert worst(25 * 1024 * 1024, model="gpt-4o-transcribe-custom").audio_prompt > 16_000
    with_prompt = worst(750, prompt="Names: Anna, Bartholomew. " * 10)
    assert with_prompt.prompt > with_prompt.audio_prompt == 17


def test_an_image_edit_holds_its_input_images_and_the_image_asked_for() -> None:
    config = GatewayConfig()

    def worst(files: int, **fields: str) -> estimate.WorstCase:
        return estimate.upload_worst_case("image_edit", fields, files, 10_000, config, None, "gpt-image-1")

    one = worst(1, prompt="make it blue", quality="low", size="1024x1024")
    assert one == (3 + estimate.IMAGE_TOKENS, 272, 0, estimate.IMAGE_TOKENS)
    # Three images and a mask; n images of the dearest kind when quality and size are left out.
    assert worst(4, prompt="x", n="3").image_prompt == 4 * estimate.IMAGE_TOKENS
    assert worst(4, prompt="x", n="3").output == 3 * 6240
    # An `n` OpenAI refuses costs nothing; it holds one image.
    assert worst(1, n="9" * 5000).output == worst(1, n="many").output == 6240
