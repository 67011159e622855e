"""What the fake OpenAI upstream answers, and the bytes it answers with. Pure functions, no I/O.

Framing follows recordings of api.openai.com chat completions (2025-2026):
- non-streamed bodies are pretty-printed with a 2-space indent and end in a newline; error bodies use a
  4-space indent (they come from a different layer at OpenAI);
- stream events are ``data: <compact JSON>\\n\\n`` with UTF-8 left unescaped, ending ``data: [DONE]\\n\\n``;
- chunk keys come in the order id, object, created, model, service_tier, system_fingerprint, choices,
  usage (present, as null, only when ``stream_options.include_usage`` is true), obfuscation (a padding
  string, omitted when ``stream_options.include_obfuscation`` is false).

Default usage is deterministic so tests can assert it:
- prompt_tokens = 3 per message + the whitespace-separated words of every text in ``messages``
  (string contents and ``{"type": "text"}`` parts); for embeddings, the words of each input string, or the
  length of each token array;
- completion_tokens = the number of pieces the reply streams in: content pieces (``split_pieces``) plus
  tool-call argument fragments;
- total_tokens = prompt_tokens + completion_tokens; every ``*_details`` counter is 0.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import random
import re
import string
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

JSON = dict[str, Any]

DEFAULT_CONTENT = "Hello from the fake upstream."
SYSTEM_FINGERPRINT = "fp_f4ce0c0ffe"
DEFAULT_EMBEDDING_DIMENSIONS = 8
DONE = b"data: [DONE]\n\n"

# OpenAI answers an alias with the snapshot that served it; pricing tables must cope with both names.
MODEL_SNAPSHOTS = {
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4.1": "gpt-4.1-2025-04-14",
    "gpt-4.1-mini": "gpt-4.1-mini-2025-04-14",
    "gpt-4.1-nano": "gpt-4.1-nano-2025-04-14",
    "o4-mini": "o4-mini-2025-04-16",
    "o3-mini": "o3-mini-2025-01-31",
    "gpt-3.5-turbo": "gpt-3.5-turbo-0125",
}
LISTED_MODELS = [
    ("gpt-4o-mini", 1721172741),
    ("gpt-4o-mini-2024-07-18", 1721172717),
    ("gpt-4o", 1715367049),
    ("gpt-4o-2024-08-06", 1722814719),
    ("gpt-4.1", 1744316542),
    ("gpt-4.1-2025-04-14", 1744315746),
    ("o3-mini", 1737146383),
    ("o3-mini-2025-01-31", 1738010200),
    ("text-embedding-3-small", 1705948997),
    ("text-embedding-3-large", 1705953180),
    ("omni-moderation-latest", 1731689265),
    ("other-model", 1700000000),  # matches no family, for tests that filter the list
]

# Short keys a test may put at the top of a scripted usage; they belong in a *_details object.
# audio_tokens is left out on purpose: it exists in both details objects.
_USAGE_SHORTHAND = {
    "cached_tokens": "prompt_tokens_details",
    "reasoning_tokens": "completion_tokens_details",
    "accepted_prediction_tokens": "completion_tokens_details",
    "rejected_prediction_tokens": "completion_tokens_details",
}
# Word-ish pieces with their leading whitespace, punctuation runs apart, like a BPE token stream;
# "".join(pieces) always gives the text back.
_PIECE = re.compile(r"\s*(?:\w+|[^\w\s]+)|\s+")
_ALNUM = string.ascii_letters + string.digits
_FORMAT_EXAMPLES = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "00:00:00Z",
    "email": "user@example.com",
    "uri": "https://example.com",
    "uuid": "00000000-0000-4000-8000-000000000000",
}
_STATUS_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: (
        "invalid_request_error",
        "unsupported_country_region_territory",
        "Country, region, or territory not supported",
    ),
    404: (
        "invalid_request_error",
        "model_not_found",
        "The model `{model}` does not exist or you do not have access to it.",
    ),
    409: ("invalid_request_error", None, "The request conflicted with another request."),
    422: ("invalid_request_error", None, "The request could not be processed."),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for {model} in organization org-fake on requests per min (RPM): Limit 3, "
        "Used 3, Requested 1. Please try again in 20s. Visit "
        "https://platform.openai.com/account/rate-limits to learn more.",
    ),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    503: ("server_error", None, "The engine is currently overloaded, please try again later"),
}


@dataclass(frozen=True)
class Reply:
    """A scripted answer for one chat completion; unset fields fall back to the defaults."""

    content: str | None = None
    tool_calls: Sequence[Mapping[str, Any]] | None = None  # [{"name", "arguments": dict | str, "id"?}]
    usage: Mapping[str, Any] | None = None  # deep-merged over the default usage
    model: str | None = None
    finish_reason: str | None = None
    chunks: Sequence[str] | None = None  # exact content pieces to stream
    stream_usage: bool | None = None  # False: ignore include_usage, like some OpenAI-compatible servers
    service_tier: str | None = None  # the tier the answer reports; else as OpenAI answers the request's


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str

    def as_json(self) -> JSON:
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": self.id, "type": "function", "function": function}


@dataclass(frozen=True)
class Plan:
    """Everything one chat completion will say, whether it is sent as one body or as chunks."""

    model: str
    pieces: list[str]
    tool_calls: list[ToolCall]
    finish_reason: str
    usage: JSON
    stream_usage: bool | None
    service_tier: str = "default"

    @property
    def content(self) -> str | None:
        return "".join(self.pieces) if self.pieces or not self.tool_calls else None


def random_id(prefix: str, length: int) -> str:
    # Not secrets: ids only need to be unique, and this runs per request under benchmark load.
    return prefix + "".join(random.choices(_ALNUM, k=length))


def hex_id(prefix: str, length: int) -> str:
    """Ids like resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b: the Responses-era id format."""
    return prefix + random.randbytes((length + 1) // 2).hex()[:length]


def compact(value: Any) -> str:
    return orjson.dumps(value).decode()


def dump_body(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2) + b"\n"


def dump_error(value: Any) -> bytes:
    return json.dumps(value, indent=4, ensure_ascii=False).encode() + b"\n"


def sse(value: Any) -> bytes:
    return b"data: " + orjson.dumps(value) + b"\n\n"


def snapshot_model(model: str) -> str:
    return MODEL_SNAPSHOTS.get(model, model)


def split_pieces(text: str) -> list[str]:
    return _PIECE.findall(text)


NO_KEY_MESSAGE = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using "
    "Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank username) if "
    "you're accessing the API from your browser and are prompted for a username and password. You can "
    "obtain an API key from https://platform.openai.com/account/api-keys."
)
# Azure OpenAI's answer to a missing or wrong `api-key` header.
AZURE_ACCESS_DENIED = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key "
    "for an active subscription and use a correct regional API endpoint for your resource."
)
# A project key on an organization endpoint (they take an admin key).
ADMIN_ONLY_MESSAGE = (
    "You have insufficient permissions for this operation. Missing scopes: api.usage.read. Check that you "
    "have the correct role in your organization (Owner), and if you're using a restricted API key, that it "
    "has the necessary scopes."
)
_BAD_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
    "HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON. "
    "If you have trouble figuring out how to fix this, please contact us through our help center at "
    "help.openai.com.)"
)


def error(message: str, type_: str, code: str | None = None, param: str | None = None) -> JSON:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def status_error(status: int, model: str) -> JSON:
    fallback = _STATUS_ERRORS[500] if status >= 500 else _STATUS_ERRORS[400]
    type_, code, message = _STATUS_ERRORS.get(status, fallback)
    return error(message.format(model=model), type_, code)


def invalid_request(body: Any, required: str) -> JSON | None:
    """OpenAI's 400 body for an unparseable body or a missing required field, else None."""
    if not isinstance(body, dict):
        return error(_BAD_JSON, "invalid_request_error")
    if "model" not in body:
        return error("you must provide a model parameter", "invalid_request_error")
    if required not in body:
        message = f"Missing required parameter: '{required}'."
        return error(message, "invalid_request_error", "missing_required_parameter", required)
    return None


def mask_key(key: str) -> str:
    return key[:3] + "*" * max(0, len(key) - 7) + key[-4:] if len(key) > 8 else key


def base_usage(prompt_tokens: int, completion_tokens: int) -> JSON:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def merge_usage(usage: JSON, override: Mapping[str, Any] | None) -> JSON:
    """Overlay a scripted usage; total_tokens follows the parts unless the script sets it."""
    if not override:
        return usage
    merged = copy.deepcopy(usage)
    for key, value in override.items():
        section = _USAGE_SHORTHAND.get(key)
        if section is not None:
            merged[section][key] = value
        elif isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    if "total_tokens" not in override:
        merged["total_tokens"] = merged["prompt_tokens"] + merged["completion_tokens"]
    return merged


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [p["text"] for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str)]
    return []


def prompt_tokens(body: Mapping[str, Any]) -> int:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 0
    words = sum(
        len(text.split()) for m in messages if isinstance(m, Mapping) for text in _texts(m.get("content"))
    )
    return 3 * len(messages) + words


def schema_instance(schema: Mapping[str, Any], root: Mapping[str, Any] | None = None) -> Any:
    """A minimal value that validates against ``schema`` (the subset Structured Outputs accepts)."""
    root = schema if root is None else root
    if "$ref" in schema:
        target: Any = root
        for part in str(schema["$ref"]).removeprefix("#/").split("/"):
            target = target[part]
        return schema_instance(target, root)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            options = [o for o in schema[key] if o.get("type") != "null"] or schema[key]
            return schema_instance(options[0], root)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        return {name: schema_instance(sub, root) for name, sub in schema.get("properties", {}).items()}
    if kind == "array":
        return [schema_instance(schema.get("items", {}), root)] * max(1, int(schema.get("minItems", 1)))
    if kind in ("integer", "number"):
        value = max(1, schema.get("minimum", 1))
        return min(value, schema.get("maximum", value))
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return _FORMAT_EXAMPLES.get(str(schema.get("format")), "example")


def _default_content(body: Mapping[str, Any]) -> str:
    response_format = body.get("response_format")
    if isinstance(response_format, Mapping):
        if response_format.get("type") == "json_schema":
            return compact(schema_instance(response_format.get("json_schema", {}).get("schema", {})))
        if response_format.get("type") == "json_object":
            return compact({"message": DEFAULT_CONTENT})
    return DEFAULT_CONTENT


def _tool_calls(body: Mapping[str, Any], reply: Reply) -> list[ToolCall]:
    if reply.tool_calls is not None:
        return [
            ToolCall(
                id=str(spec.get("id") or random_id("call_", 24)),
                name=str(spec["name"]),
                arguments=a if isinstance(a := spec.get("arguments", {}), str) else compact(a),
            )
            for spec in reply.tool_calls
        ]
    tools = [t["function"] for t in body.get("tools") or [] if t.get("type") == "function"]
    choice = body.get("tool_choice")
    if not tools or reply.content is not None or reply.chunks is not None:
        return []
    if isinstance(choice, Mapping):
        named = (choice.get("function") or {}).get("name")
        tools = [t for t in tools if t.get("name") == named] or tools
    elif choice != "required":
        return []
    parameters = tools[0].get("parameters") or {"type": "object", "properties": {}}
    return [ToolCall(random_id("call_", 24), tools[0]["name"], compact(schema_instance(parameters)))]


def plan_reply(body: Mapping[str, Any], reply: Reply | None) -> Plan:
    reply = reply or Reply()
    tool_calls = _tool_calls(body, reply)
    if reply.chunks is not None:
        pieces = list(reply.chunks)
    elif reply.content is not None:
        pieces = split_pieces(reply.content)
    else:
        pieces = [] if tool_calls else split_pieces(_default_content(body))
    finish_reason = reply.finish_reason or ("tool_calls" if tool_calls else "stop")
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and reply.finish_reason is None and not tool_calls and len(pieces) > limit:
        pieces, finish_reason = pieces[:limit], "length"
    completion = len(pieces) + sum(len(split_pieces(c.arguments)) for c in tool_calls)
    return Plan(
        model=reply.model or snapshot_model(str(body.get("model", ""))),
        pieces=pieces,
        tool_calls=tool_calls,
        finish_reason=finish_reason,
        usage=merge_usage(base_usage(prompt_tokens(body), completion), reply.usage),
        stream_usage=reply.stream_usage,
        service_tier=reply.service_tier or answered_tier(body),
    )


def answered_tier(body: Mapping[str, Any]) -> str:
    """The tier OpenAI reports serving a request with: the one it asked for, `auto` being `default`."""
    asked = body.get("service_tier")
    return asked if asked in ("flex", "priority", "scale") else "default"


def completion_body(plan: Plan, completion_id: str, created: int) -> JSON:
    message: JSON = {"role": "assistant", "content": plan.content}
    if plan.tool_calls:
        message["tool_calls"] = [call.as_json() for call in plan.tool_calls]
    message |= {"refusal": None, "annotations": []}
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": plan.model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": plan.finish_reason}],
        "usage": plan.usage,
        "service_tier": plan.service_tier,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


def _deltas(plan: Plan) -> list[tuple[JSON, str | None]]:
    if plan.tool_calls:
        first: JSON = {"role": "assistant", "content": None}
    else:
        first = {"role": "assistant", "content": "", "refusal": None}
    deltas: list[tuple[JSON, str | None]] = [(first, None)]
    deltas += [({"content": piece}, None) for piece in plan.pieces]
    for index, call in enumerate(plan.tool_calls):
        opening: list[JSON] = [{"index": index, **call.as_json()}]
        opening[0]["function"] = {"name": call.name, "arguments": ""}
        if index == 0:
            # OpenAI folds the first call's opening into the role chunk.
            first |= {"tool_calls": opening, "refusal": None}
        else:
            deltas.append(({"tool_calls": opening}, None))
        deltas += [
            ({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}, None)
            for fragment in split_pieces(call.arguments)
        ]
    deltas.append(({}, plan.finish_reason))
    return deltas


def stream_chunks(
    plan: Plan, completion_id: str, created: int, *, include_usage: bool, obfuscate: bool
) -> list[JSON]:
    """The chunk objects of one streamed completion, without the SSE framing and [DONE]."""
    head = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": plan.model,
        "service_tier": plan.service_tier,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    chunks: list[JSON] = []
    for delta, finish_reason in _deltas(plan):
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        chunks.append(head | {"choices": [choice]} | ({"usage": None} if include_usage else {}))
    if include_usage:
        chunks.append(head | {"choices": [], "usage": plan.usage})
    if obfuscate:
        for index, chunk in enumerate(chunks):
            digest = hashlib.blake2s(f"{completion_id}:{index}".encode()).hexdigest()
            chunk["obfuscation"] = digest[: 1 + index * 7 % 12]
    return chunks


def _embedding_inputs(value: Any) -> list[str | list[int]]:
    if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], int)):
        return [value]
    return list(value) if isinstance(value, list) else []


def embeddings_body(body: Mapping[str, Any]) -> JSON:
    """Vectors derived from a hash of each input; every value is k/128, exact in float32 and base64."""
    dimensions = body.get("dimensions") or DEFAULT_EMBEDDING_DIMENSIONS
    data: list[JSON] = []
    tokens = 0
    for index, item in enumerate(_embedding_inputs(body.get("input"))):
        tokens += len(item.split()) if isinstance(item, str) else len(item)
        seed = item if isinstance(item, str) else compact(item)
        vector = [(byte - 128) / 128 for byte in hashlib.shake_256(seed.encode()).digest(dimensions)]
        embedding: list[float] | str = vector
        if body.get("encoding_format") == "base64":
            embedding = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"object": "list", "data": data, "model": str(body.get("model")), "usage": usage}


def model_object(model: str, created: int) -> JSON:
    return {"id": model, "object": "model", "created": created, "owned_by": "system"}


def models_body() -> JSON:
    return {"object": "list", "data": [model_object(name, created) for name, created in LISTED_MODELS]}


# Category, and whether OpenAI's omni-moderation also applies it to images.
_MODERATION_CATEGORIES = [
    ("harassment", False),
    ("harassment/threatening", False),
    ("hate", False),
    ("hate/threatening", False),
    ("illicit", False),
    ("illicit/violent", False),
    ("self-harm", True),
    ("self-harm/intent", True),
    ("self-harm/instructions", True),
    ("sexual", True),
    ("sexual/minors", False),
    ("violence", True),
    ("violence/graphic", True),
]
MODERATION_SNAPSHOTS = {
    "omni-moderation-latest": "omni-moderation-2024-09-26",
    "text-moderation-latest": "text-moderation-007",
}


def _moderation_result(kinds: set[str], seed: str) -> JSON:
    scores = hashlib.shake_256(seed.encode()).digest(len(_MODERATION_CATEGORIES))
    applied = {
        name: [k for k in ("text", "image") if k in kinds and (k == "text" or images)]
        for name, images in _MODERATION_CATEGORIES
    }
    return {
        "flagged": False,
        "categories": {name: False for name, _ in _MODERATION_CATEGORIES},
        "category_scores": {
            name: (score + 1) / 1e6 for (name, _), score in zip(_MODERATION_CATEGORIES, scores, strict=True)
        },
        "category_applied_input_types": applied,
    }


def moderation_body(body: Mapping[str, Any]) -> JSON:
    """Nothing is ever flagged; scores are tiny and derived from the input. One result per input string,
    one for a whole list of multimodal parts."""
    value = body.get("input")
    results: list[JSON]
    if isinstance(value, list) and any(isinstance(part, Mapping) for part in value):
        kinds = {"image" if part.get("type") == "image_url" else "text" for part in value}
        results = [_moderation_result(kinds, compact(value))]
    else:
        texts = value if isinstance(value, list) else [value]
        results = [_moderation_result({"text"}, str(text)) for text in texts]
    model = str(body.get("model") or "omni-moderation-latest")
    return {"id": hex_id("modr-", 32), "model": MODERATION_SNAPSHOTS.get(model, model), "results": results}
