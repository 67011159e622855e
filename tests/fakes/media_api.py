"""The fake's uploads that cost money: POST /v1/audio/transcriptions, /v1/audio/translations and
/v1/images/edits, multipart forms read part by part as the Files API reads them (``files_api.read_form``).

Their answers have OpenAI's shapes: a transcription's ``text`` with, for the gpt-4o transcribe models,
token ``usage`` (``input_token_details`` with its text and audio tokens), for whisper-1 ``duration`` usage;
a translation's ``text`` alone; an image edit's ``data`` with gpt-image-1's token ``usage``
(``input_tokens_details`` with its text and image tokens). The counts are the fake's own, made to stay
below what the real service bills at most:
- audio lasts ``upload_size / AUDIO_BYTES_PER_SECOND`` seconds (a 128 kb/s mp3) and makes 10 tokens a
  second (the Realtime API's one token per 100 ms);
- an input image makes ``IMAGE_INPUT_TOKENS`` (a 1024x1024 image at low input fidelity);
- an output image makes the tokens OpenAI's image generation guide lists for its quality and size
  (``auto`` or none: medium, square).
Deliberate divergences: one output image whatever ``n`` asks for, one transparent pixel as its content;
the transcript is a fixed sentence; only ``response_format=json`` (the default).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from aiohttp import BodyPartReader, web

from tests.fakes import openai_payloads as p
from tests.fakes.answers import Answer, Body, Incoming, Router, error_body, json_body
from tests.fakes.files_api import READ_CHUNK

AUDIO_BYTES_PER_SECOND = 16_000
AUDIO_TOKENS_PER_SECOND = 10
IMAGE_INPUT_TOKENS = 135
TRANSCRIPT = "The quick brown fox jumps over the lazy dog."
# A 1x1 transparent PNG.
PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
_OUTPUT_TOKENS = {"low": (272, 408), "medium": (1056, 1584), "high": (4160, 6240)}


async def _read_parts(request: web.Request) -> tuple[dict[str, str], list[tuple[str, int, str]]]:
    """The text fields, and each file part's field name, size and sha256."""
    fields: dict[str, str] = {}
    files: list[tuple[str, int, str]] = []
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader) or part.name is None:
            await part.release()
        elif part.filename is not None:
            size, hasher = 0, hashlib.sha256()
            while chunk := await part.read_chunk(READ_CHUNK):
                size += len(chunk)
                hasher.update(chunk)
            files.append((part.name, size, hasher.hexdigest()))
        else:
            fields[part.name] = await part.text()
    return fields, files


def _missing(name: str) -> Body:
    return error_body(
        400, f"Missing required parameter: '{name}'.", code="missing_required_parameter", param=name
    )


async def _form(
    incoming: Incoming,
) -> tuple[dict[str, str], list[tuple[str, int, str]], dict[str, Any]] | Body:
    request = incoming.request
    if request.content_type != "multipart/form-data":
        message = f"Invalid Content-Type header ({request.content_type}), expected multipart/form-data."
        return error_body(400, message)
    fields, files = await _read_parts(request)
    record = {
        "body_size": request.content.total_bytes,
        # The first file's, as the Files API records its one file.
        "upload_size": files[0][1] if files else None,
        "upload_sha256": files[0][2] if files else None,
        "form": fields,
    }
    return fields, files, record


def _refused(problem: Body, record: dict[str, Any]) -> Body:
    return Body(problem.status, problem.payload, record=record)


async def transcriptions(incoming: Incoming) -> Answer:
    read = await _form(incoming)
    if isinstance(read, Body):
        return read
    fields, files, record = read
    audio = [size for name, size, _ in files if name == "file"]
    if not audio:
        return _refused(_missing("file"), record)
    if "model" not in fields:
        return _refused(_missing("model"), record)
    seconds = max(1, -(-audio[0] // AUDIO_BYTES_PER_SECOND))
    if fields["model"] == "whisper-1":
        usage: dict[str, Any] = {"type": "duration", "seconds": seconds}
    else:
        audio_tokens = seconds * AUDIO_TOKENS_PER_SECOND
        text_tokens = len(fields.get("prompt", "").split())
        output_tokens = len(TRANSCRIPT.split()) + 2
        usage = {
            "type": "tokens",
            "input_tokens": audio_tokens + text_tokens,
            "input_token_details": {"text_tokens": text_tokens, "audio_tokens": audio_tokens},
            "output_tokens": output_tokens,
            "total_tokens": audio_tokens + text_tokens + output_tokens,
        }
    body = json_body({"text": TRANSCRIPT, "usage": usage}, usage=usage)
    return Body(body.status, body.payload, usage, record=record)


async def translations(incoming: Incoming) -> Answer:
    read = await _form(incoming)
    if isinstance(read, Body):
        return read
    fields, files, record = read
    if not any(name == "file" for name, _, _ in files):
        return _refused(_missing("file"), record)
    if "model" not in fields:
        return _refused(_missing("model"), record)
    return Body(200, p.dump_body({"text": TRANSCRIPT}), record=record)


async def edits(incoming: Incoming) -> Answer:
    read = await _form(incoming)
    if isinstance(read, Body):
        return read
    fields, files, record = read
    images = [name for name, _, _ in files if name in ("image", "image[]")]
    if not images:
        return _refused(_missing("image"), record)
    if "prompt" not in fields:
        return _refused(_missing("prompt"), record)
    quality = fields.get("quality", "auto")
    size = fields.get("size", "auto")
    square, other = _OUTPUT_TOKENS.get(quality, _OUTPUT_TOKENS["medium"])
    output_tokens = square if size in ("1024x1024", "auto") else other
    image_tokens = IMAGE_INPUT_TOKENS * len(images)
    text_tokens = len(fields["prompt"].split())
    usage = {
        "total_tokens": image_tokens + text_tokens + output_tokens,
        "input_tokens": image_tokens + text_tokens,
        "output_tokens": output_tokens,
        "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": image_tokens},
    }
    payload = {
        "created": int(time.time()),
        "data": [{"b64_json": PIXEL}],
        "background": "opaque",
        "output_format": "png",
        "quality": "medium" if quality == "auto" else quality,
        "size": "1024x1024" if size == "auto" else size,
        "usage": usage,
    }
    body = json_body(payload, usage=usage)
    return Body(body.status, body.payload, usage, record=record)


def register(router: Router) -> None:
    router.add("POST", "/v1/audio/transcriptions", transcriptions)
    router.add("POST", "/v1/audio/translations", translations)
    router.add("POST", "/v1/images/edits", edits)
