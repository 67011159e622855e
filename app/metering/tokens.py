"""Offline token counting for OpenAI models.

Counts are exact for plain text: the BPE ranks are OpenAI's published ``.tiktoken`` files (MIT, from
tiktoken's own source), shipped gzipped with this package in ``vocab/``, checked against the SHA-256
that tiktoken itself pins when the gateway starts (:func:`verify_vocabularies`), and loaded into
``tiktoken.Encoding`` so the Rust core does the work. Nothing is downloaded at run time: tiktoken's
own ``get_encoding`` would fetch from a blob store this gateway may not reach.

Deliberate approximations in :func:`count_chat_prompt`:

- Messages follow the OpenAI cookbook formula (3 tokens per message, +1 per ``name``, +3 to prime
  the reply). It matches the API's ``prompt_tokens`` for the gpt-3.5/gpt-4/gpt-4o families; reasoning
  models (o-series, gpt-5) wrap the prompt in formatting that is not published, so expect a few tokens
  of drift there.
- ``tools`` / ``functions`` are counted by serialising each definition as compact JSON. OpenAI renders
  them in an unpublished format, so this is an estimate (usually an over-estimate).
- Image, audio and file parts are not counted: their cost depends on detail/size, not on text.
- Tool-call ids (``tool_call_id``, ``tool_calls[].id``) are API bookkeeping and are not counted.
- Special-token text such as ``<|endoftext|>`` in user content counts as ordinary text, as the API does.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import importlib.resources
import json
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Final

import tiktoken

O200K_BASE: Final = "o200k_base"
CL100K_BASE: Final = "cl100k_base"

# Copied from tiktoken_ext/openai_public.py: the hashes pin the exact vocabularies OpenAI publishes,
# so a repackaged or truncated file fails loudly instead of miscounting silently.
_EXPECTED_SHA256: Final[dict[str, str]] = {
    CL100K_BASE: "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    O200K_BASE: "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}

_PAT_STR: Final[dict[str, str]] = {
    CL100K_BASE: (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
        r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
    ),
    O200K_BASE: "|".join(
        [
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""\p{N}{1,3}""",
            r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
            r"""\s*[\r\n]+""",
            r"""\s+(?!\S)""",
            r"""\s+""",
        ]
    ),
}

_SPECIAL_TOKENS: Final[dict[str, dict[str, int]]] = {
    CL100K_BASE: {
        "<|endoftext|>": 100257,
        "<|fim_prefix|>": 100258,
        "<|fim_middle|>": 100259,
        "<|fim_suffix|>": 100260,
        "<|endofprompt|>": 100276,
    },
    O200K_BASE: {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
}

# gpt-oss's o200k_harmony has o200k_base's ranks and split pattern and differs only in special tokens,
# which never matter here because counting encodes special-token text as ordinary text. The retired
# GPT-3-era encodings are not shipped; their models are gone, so an o200k estimate is good enough.
_COUNTED_WITH: Final[dict[str, str]] = {CL100K_BASE: CL100K_BASE, O200K_BASE: O200K_BASE}
_DEFAULT_ENCODING: Final = O200K_BASE

_TOKENS_PER_MESSAGE: Final = 3
_TOKENS_PER_NAME: Final = 1
_REPLY_PRIMING: Final = 3
_UNCOUNTED_MESSAGE_KEYS: Final = frozenset({"tool_call_id"})
_TEXT_PART_KEYS: Final = ("text", "refusal")

_build_lock = threading.Lock()
# Encodings built so far in this process (each costs ~25-50 MB for the life of the process).
_built: set[str] = set()


class VocabularyError(RuntimeError):
    """A shipped vocabulary file is missing or is not the one OpenAI publishes."""


def _vocabulary(name: str) -> bytes:
    path = importlib.resources.files("app.metering").joinpath("vocab", f"{name}.tiktoken.gz")
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as exc:
        raise VocabularyError(f"tokenizer vocabulary {name} cannot be read ({exc}): reinstall") from exc
    if hashlib.sha256(raw).hexdigest() != _EXPECTED_SHA256[name]:
        raise VocabularyError(f"tokenizer vocabulary {name} does not match its pinned SHA-256: reinstall")
    return raw


def verify_vocabularies() -> None:
    """At start-up (~40 ms of CPU): a damaged install stops the gateway there, rather than failing the first
    call that must be counted, hours later."""
    for name in _EXPECTED_SHA256:
        _vocabulary(name)


@functools.cache
def _build_encoding(name: str) -> tiktoken.Encoding:
    raw = _vocabulary(name)
    # Same parsing as tiktoken.load.load_tiktoken_bpe, which only takes a path and would also copy the
    # file into a temp-dir cache.
    pairs = (line.split() for line in raw.splitlines() if line)
    ranks = {base64.b64decode(token): int(rank) for token, rank in pairs}
    encoding = tiktoken.Encoding(
        name=name,
        pat_str=_PAT_STR[name],
        mergeable_ranks=ranks,
        special_tokens=_SPECIAL_TOKENS[name],
    )
    # tiktoken keeps this Python copy of the vocabulary only to pickle the encoding; the Rust core that
    # encodes holds its own. Dropped, the two encodings take ~37 MB less for the life of the process.
    encoding._mergeable_ranks = {}
    _built.add(name)
    return encoding


@functools.cache
def get_encoding(name: str) -> tiktoken.Encoding:
    """The shipped encoding ``name`` (``o200k_base`` or ``cl100k_base``), built once per process."""
    if name not in _EXPECTED_SHA256:
        raise ValueError(f"encoding {name!r} is not shipped; expected one of {sorted(_EXPECTED_SHA256)}")
    # functools.cache alone lets two threads that miss at once both build a ~200k-entry vocabulary.
    with _build_lock:
        return _build_encoding(name)


def preload() -> None:
    """Build both encodings (about 0.7 s of CPU); run it off the event loop at start-up."""
    for name in _EXPECTED_SHA256:
        get_encoding(name)


# Model names come from clients, so the cache is bounded.
@functools.lru_cache(maxsize=1024)
def _encoding_name_for_model(model: str) -> str:
    try:
        name = tiktoken.encoding_name_for_model(model.strip().lower())
    except KeyError:
        # Every OpenAI model released since gpt-4o uses o200k_base.
        return _DEFAULT_ENCODING
    return _COUNTED_WITH.get(name, _DEFAULT_ENCODING)


def is_built_for(model: str) -> bool:
    """Whether counting for ``model`` can start at once, without building its encoding first."""
    name = _encoding_name_for_model(model) if isinstance(model, str) else _DEFAULT_ENCODING
    return name in _built


def encoding_for_model(model: str) -> tiktoken.Encoding:
    """The encoding that ``model`` bills with; unknown models get ``o200k_base``."""
    # The model often comes straight from a request body, where it may be missing or not a string.
    if not isinstance(model, str):
        return get_encoding(_DEFAULT_ENCODING)
    return get_encoding(_encoding_name_for_model(model))


def count_text(model: str, text: str) -> int:
    if not isinstance(text, str) or not text:
        return 0
    return len(encoding_for_model(model).encode_ordinary(text))


def count_input(model: str, value: str | list[Any]) -> int:
    """Tokens billed for an embeddings ``input``: a string, strings, a token array or token arrays."""
    enc = encoding_for_model(model)
    if isinstance(value, str):
        return _count(enc, value)
    if not isinstance(value, list):
        return 0
    total = 0
    for item in value:
        if isinstance(item, str):
            total += _count(enc, item)
        elif _is_token_id(item):
            total += 1
        elif isinstance(item, list):
            total += sum(1 for token in item if _is_token_id(token))
    return total


def count_chat_prompt(model: str, body: Mapping[str, Any]) -> int:
    """Estimated ``prompt_tokens`` of a chat.completions request body; see the module docstring."""
    if not isinstance(body, Mapping):
        return 0
    enc = encoding_for_model(model)
    total = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, Mapping):
                total += _TOKENS_PER_MESSAGE + _count_message(enc, message)
        total += _REPLY_PRIMING
    total += _count_definitions(enc, _tool_functions(body.get("tools")))
    functions = body.get("functions")
    if isinstance(functions, list):
        total += _count_definitions(enc, functions)
    return total


def _count(enc: tiktoken.Encoding, text: str) -> int:
    return len(enc.encode_ordinary(text)) if text else 0


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count_message(enc: tiktoken.Encoding, message: Mapping[str, Any]) -> int:
    total = 0
    for key, value in message.items():
        if key in _UNCOUNTED_MESSAGE_KEYS:
            continue
        if isinstance(value, str):
            total += _count(enc, value)
            if key == "name":
                total += _TOKENS_PER_NAME
        elif key == "content" and isinstance(value, list):
            total += sum(_count_part(enc, part) for part in value)
        elif key == "tool_calls" and isinstance(value, list):
            calls = (call.get("function") for call in value if isinstance(call, Mapping))
            total += sum(_count_call(enc, function) for function in calls)
        elif key == "function_call":
            total += _count_call(enc, value)
    return total


def _count_part(enc: tiktoken.Encoding, part: object) -> int:
    if isinstance(part, str):
        return _count(enc, part)
    if not isinstance(part, Mapping):
        return 0
    for key in _TEXT_PART_KEYS:
        text = part.get(key)
        if isinstance(text, str):
            return _count(enc, text)
    return 0


def _count_call(enc: tiktoken.Encoding, function: object) -> int:
    if not isinstance(function, Mapping):
        return 0
    texts = (function.get(key) for key in ("name", "arguments"))
    return sum(_count(enc, text) for text in texts if isinstance(text, str))


def _tool_functions(tools: object) -> Iterable[object]:
    if not isinstance(tools, list):
        return ()
    # Non-function tools (custom, built-in) are serialised whole: still text the model is shown.
    return (tool.get("function", tool) if isinstance(tool, Mapping) else tool for tool in tools)


def _count_definitions(enc: tiktoken.Encoding, definitions: Iterable[object]) -> int:
    total = 0
    for definition in definitions:
        if not isinstance(definition, Mapping):
            continue
        try:
            text = json.dumps(definition, ensure_ascii=False, separators=(",", ":"), default=str)
        except (TypeError, ValueError, RecursionError):
            # A circular or absurdly deep definition cannot be what the upstream sees either.
            continue
        total += _count(enc, text)
    return total
