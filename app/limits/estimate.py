"""What a call may be billed for, estimated from its request alone before it is made: the tokens its
prompt may count, and, for the passthrough endpoints whose answers the gateway meters, the most output it
may produce. Budgets reserve the cost of these; the real usage settles it after the call.

The prompt estimate must not fall short for the usual request, and must cost next to nothing: it runs on
every limited call, before the call is made, where counting with a tokenizer would cost ~1 µs per
100 tokens of prompt. So it reads the body's bytes, never its structure (a pass or two of C over them,
~2-3 ns a byte), with these rules:
- every byte is a quarter of a token: English prose runs at four to five characters a token, and the
  JSON around the text, counted too, covers the per-message overhead;
- an ASCII byte that is no letter or space (digits, punctuation, the JSON's own syntax) is half a token
  more: code, numbers and minified text run at two to three characters a token;
- a byte outside ASCII is a quarter of a token more: a CJK character (three bytes of UTF-8) makes one
  and a half, a Cyrillic or Greek one (two bytes) one; tokenizers spend about one token on each such
  character, more on rare ones;
- an image given by URL or by file id is a few bytes but is billed by its pixels: each counts as
  IMAGE_TOKENS, the most OpenAI bills one image at its default detail on any model (1,536 patches at
  gpt-4.1-nano's multiplier of 2.46). An image inlined as base64 is counted by its bytes, far above.
Audio inlined as base64 is counted by its bytes too: far more than it costs. What can still fall short:
long runs of random letters (base64 pasted as text, hashes), at about 1.6 characters a token.

An upload (a transcription, an image edit) is bounded by its form (`upload_worst_case`): its text prompt
as above; each input image as IMAGE_TOKENS, above the ~3,050 tokens gpt-image-1 bills a 1024x1024 input
image at high input fidelity; the audio by the longest it can last in its bytes, at AUDIO_BYTES_PER_SECOND
(6 kb/s, Opus's lowest bitrate: a file of any format OpenAI takes, flac, mp3, mp4, mpeg, mpga, m4a, ogg,
wav or webm, lasts no longer for its size unless it carries an unusual speech codec), times
AUDIO_TOKENS_PER_SECOND (17, above the 1,000 a minute OpenAI's estimate of $0.006 a minute implies for
gpt-4o-transcribe at $6 per 1M audio tokens), and never more than the model's context window.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from app.config_file import GatewayConfig
from app.limits.guard import worst_case_output

IMAGE_TOKENS = 3800
# How a request names an image: a chat content part's `image_url` object, or a Responses `input_image`
# part (by URL or file id); a part spelled with both is counted twice, which errs on the safe side.
_IMAGE_MARKS = (b'"image_url":', b'"input_image"')
_NON_ASCII = bytes(range(128, 256))
_SYMBOLS = bytes(b for b in range(128) if not chr(b).isalpha() and b != ord(" "))

# gpt-image-1's output tokens per image by quality, for the square size and for the largest other size
# (OpenAI's image generation guide); an unknown or `auto` quality or size counts as the dearest.
_IMAGE_OUTPUT: dict[str, tuple[int, int]] = {"low": (272, 408), "medium": (1056, 1584), "high": (4160, 6240)}
_SQUARE = frozenset({"1024x1024"})

# The text fields of an upload its worst case reads.
UPLOAD_FIELDS = frozenset({"model", "prompt", "n", "size", "quality"})
AUDIO_BYTES_PER_SECOND = 750
AUDIO_TOKENS_PER_SECOND = 17
# The transcription models' context windows (OpenAI's model pages), which bound the audio they take; a
# snapshot's name is not listed, and holds its file's bound.
_AUDIO_CONTEXT = {"gpt-4o-transcribe": 16_000, "gpt-4o-mini-transcribe": 16_000}


class WorstCase(NamedTuple):
    prompt: int  # every input token, the audio and image ones among them
    output: int
    audio_prompt: int = 0
    image_prompt: int = 0


def prompt_tokens(raw: bytes) -> int:
    size = len(raw)
    estimate = size // 4 + (size - len(raw.translate(None, _SYMBOLS))) // 2
    if not raw.isascii():
        estimate += (size - len(raw.translate(None, _NON_ASCII))) // 4
    if b"image" in raw:
        estimate += IMAGE_TOKENS * sum(raw.count(mark) for mark in _IMAGE_MARKS)
    return estimate


def passthrough_output(
    rule: str, body: dict[str, Any], config: GatewayConfig, feature: str | None, model: str
) -> int:
    """The most output tokens a passed-through call may be billed for, by its endpoint's `held_output`
    rule (app/wire/endpoints.py): a legacy completion's, or an image generation's."""
    if rule == "completion":
        # `best_of` completions are generated, and billed, for the `n` returned.
        best_of = body.get("best_of")
        if type(best_of) is int and best_of > 1:
            n = body.get("n")
            body = {**body, "n": max(best_of, n if type(n) is int else 1)}
        return worst_case_output(body, config, feature, model)
    quality, size, n = body.get("quality"), body.get("size"), body.get("n")
    square, other = _IMAGE_OUTPUT.get(quality if isinstance(quality, str) else "", _IMAGE_OUTPUT["high"])
    return (square if size in _SQUARE else other) * (n if type(n) is int and n > 0 else 1)


def upload_worst_case(
    rule: str,
    fields: Mapping[str, str],
    files: int,
    file_bytes: int,
    config: GatewayConfig,
    feature: str | None,
    model: str,
) -> WorstCase:
    """The most a passed-through upload may be billed for, by its endpoint's `held_output` rule: a
    transcription's (or translation's), or an image edit's; from its UPLOAD_FIELDS and its files."""
    text = prompt_tokens(fields.get("prompt", "").encode())
    if rule == "transcription":
        audio = -(-file_bytes // AUDIO_BYTES_PER_SECOND) * AUDIO_TOKENS_PER_SECOND
        audio = min(audio, _AUDIO_CONTEXT.get(model, audio))
        # The transcript has no cap of the caller's: the default output cap bounds it, as for a chat call
        # that sets none.
        return WorstCase(text + audio, worst_case_output({}, config, feature, model), audio_prompt=audio)
    images = files * IMAGE_TOKENS
    n = fields.get("n", "")
    body = {
        "quality": fields.get("quality"),
        "size": fields.get("size"),
        # OpenAI takes at most 10: a longer number is refused upstream, and costs nothing.
        "n": int(n) if n.isdecimal() and len(n) <= 4 else 1,
    }
    output = passthrough_output("image", body, config, feature, model)
    return WorstCase(text + images, output, image_prompt=images)
