"""What the fake answers on POST /v1/responses, and the bytes it answers with. Pure functions, no I/O.

Shapes follow the openai SDK's ``types/responses`` (3.57) and recordings of api.openai.com (2025-2026):
- a non-streamed response is pretty-printed with a 2-space indent, like a chat completion;
- a stream is ``event: <type>\\ndata: <compact JSON>\\n\\n`` per event, the JSON starting with ``type`` and
  ``sequence_number``; it ends with ``response.completed`` (or ``response.incomplete``), never
  ``data: [DONE]``; delta events carry an ``obfuscation`` pad unless
  ``stream_options.include_obfuscation`` is false;
- usage is ``input_tokens`` / ``output_tokens``, with ``input_tokens_details.cached_tokens`` and
  ``cache_write_tokens`` (SDK 3.57 declares both required) and ``output_tokens_details.reasoning_tokens``.

Default usage is deterministic, like the chat fake's:
- input_tokens = 3 per input item (a string ``input`` is one item, ``instructions`` another) + the words
  of every text in them + the context the response continues (``previous_response_id`` or
  ``conversation``: that response's input + output tokens), which OpenAI bills again;
- output_tokens = the pieces the message text streams in + the pieces of function-call arguments.

The output: a ``file_search_call`` item when a ``file_search`` tool is given (the message then cites a
file of its vector stores), a ``code_interpreter_call`` item for ``code_interpreter``, then either a
message or, for a scripted ``tool_calls`` or a function tool with ``tool_choice`` "required" or named,
``function_call`` items (and no built-in tool call).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from tests.fakes import openai_payloads as p

JSON = dict[str, Any]

DEFAULT_CODE = "print(6 * 7)"
_USAGE_RENAMES = {"prompt_tokens": "input_tokens", "completion_tokens": "output_tokens"}
_USAGE_SECTIONS = {
    "prompt_tokens_details": "input_tokens_details",
    "completion_tokens_details": "output_tokens_details",
    "input_tokens_details": "input_tokens_details",
    "output_tokens_details": "output_tokens_details",
}
_USAGE_SHORTHAND = {
    "cached_tokens": "input_tokens_details",
    "cache_write_tokens": "input_tokens_details",
    "reasoning_tokens": "output_tokens_details",
}
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
_DELTAS = ("response.output_text.delta", "response.function_call_arguments.delta")


@dataclass(frozen=True)
class ResponsePlan:
    model: str
    output: list[JSON]  # the final output items
    pieces: dict[int, list[str]]  # output index -> the fragments its text or arguments stream in
    usage: JSON
    incomplete_reason: str | None
    stream_usage: bool | None


def _texts(item: Any) -> list[str]:
    if isinstance(item, str):
        return [item]
    if not isinstance(item, Mapping):
        return []
    content, texts = item.get("content"), []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        texts += [c["text"] for c in content if isinstance(c, Mapping) and isinstance(c.get("text"), str)]
    if isinstance(item.get("output"), str):  # function_call_output
        texts.append(item["output"])
    return texts


def input_items(body: Mapping[str, Any]) -> list[Any]:
    value = body.get("input")
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, list) else []
    return [body["instructions"], *items] if isinstance(body.get("instructions"), str) else items


def count_input_tokens(items: Sequence[Any]) -> int:
    return 3 * len(items) + sum(len(text.split()) for item in items for text in _texts(item))


def _last_user_text(body: Mapping[str, Any]) -> str:
    texts = [text for item in input_items(body) for text in _texts(item)]
    return texts[-1] if texts else ""


def response_usage(input_tokens: int, output_tokens: int, override: Mapping[str, Any] | None) -> JSON:
    """Responses usage; a scripted override may use chat names (prompt_tokens, cached_tokens, ...)."""
    usage: JSON = {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }
    for key, value in (override or {}).items():
        name = _USAGE_RENAMES.get(key, key)
        if (section := _USAGE_SHORTHAND.get(name)) is not None:
            usage[section][name] = value
        elif (section := _USAGE_SECTIONS.get(name)) is not None and isinstance(value, Mapping):
            chat = name != section  # chat details carry audio and prediction counters Responses lacks
            usage[section].update({k: v for k, v in value.items() if not chat or k in usage[section]})
        else:
            usage[name] = value
    if "total_tokens" not in (override or {}):
        usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
    return usage


def context_tokens(usage: Mapping[str, Any]) -> int:
    """What continuing a response (or a conversation after it) bills again as input."""
    return int(usage["input_tokens"]) + int(usage["output_tokens"])


def _default_text(body: Mapping[str, Any]) -> str:
    text_format = (body.get("text") or {}).get("format")
    if isinstance(text_format, Mapping):
        if text_format.get("type") == "json_schema":
            return p.compact(p.schema_instance(text_format.get("schema") or {}))
        if text_format.get("type") == "json_object":
            return p.compact({"message": p.DEFAULT_CONTENT})
    return p.DEFAULT_CONTENT


def _function_calls(body: Mapping[str, Any], reply: p.Reply) -> list[JSON]:
    if reply.tool_calls is not None:
        specs = [
            (str(s["name"]), a if isinstance(a := s.get("arguments", {}), str) else p.compact(a), s.get("id"))
            for s in reply.tool_calls
        ]
    else:
        tools = [t for t in body.get("tools") or [] if t.get("type") == "function"]
        choice = body.get("tool_choice")
        if not tools or reply.content is not None or reply.chunks is not None:
            return []
        if isinstance(choice, Mapping) and choice.get("type") == "function":
            tools = [t for t in tools if t.get("name") == choice.get("name")] or tools
        elif choice != "required":
            return []
        parameters = tools[0].get("parameters") or {"type": "object", "properties": {}}
        specs = [(str(tools[0]["name"]), p.compact(p.schema_instance(parameters)), None)]
    return [
        {
            "id": p.hex_id("fc_", 50),
            "type": "function_call",
            "status": "completed",
            "arguments": arguments,
            "call_id": str(call_id or p.random_id("call_", 24)),
            "name": name,
        }
        for name, arguments, call_id in specs
    ]


def _builtin_calls(body: Mapping[str, Any], files: Sequence[tuple[str, str]]) -> list[JSON]:
    if body.get("tool_choice") == "none":
        return []
    include = body.get("include") or []
    calls: list[JSON] = []
    for tool in body.get("tools") or []:
        if tool.get("type") == "file_search":
            results = None
            if "file_search_call.results" in include:
                results = [
                    {"attributes": {}, "file_id": f, "filename": n, "score": 0.9, "text": p.DEFAULT_CONTENT}
                    for f, n in files
                ]
            query = _last_user_text(body)
            calls.append(
                {
                    "id": p.hex_id("fs_", 50),
                    "type": "file_search_call",
                    "status": "completed",
                    "queries": [query] if query else [],
                    "results": results,
                }
            )
        elif tool.get("type") == "code_interpreter":
            container = tool.get("container")
            outputs = None
            if "code_interpreter_call.outputs" in include:
                outputs = [{"type": "logs", "logs": "42\n"}]
            calls.append(
                {
                    "id": p.hex_id("ci_", 50),
                    "type": "code_interpreter_call",
                    "status": "completed",
                    "code": DEFAULT_CODE,
                    "container_id": container if isinstance(container, str) else p.hex_id("cntr_", 48),
                    "outputs": outputs,
                }
            )
    return calls


def plan_response(
    body: Mapping[str, Any],
    reply: p.Reply | None,
    *,
    context_tokens: int = 0,
    files: Sequence[tuple[str, str]] = (),
) -> ResponsePlan:
    """``files``: (file_id, filename) that a file_search tool finds, the first one cited."""
    reply = reply or p.Reply()
    calls = _function_calls(body, reply)
    output = [] if calls else _builtin_calls(body, files)
    pieces: dict[int, list[str]] = {}
    incomplete = _INCOMPLETE.get(reply.finish_reason or "")
    if calls:
        for call in calls:
            pieces[len(output)] = p.split_pieces(call["arguments"])
            output.append(call)
    else:
        if reply.chunks is not None:
            text_pieces = list(reply.chunks)
        else:
            text_pieces = p.split_pieces(reply.content if reply.content is not None else _default_text(body))
        limit = body.get("max_output_tokens")
        if isinstance(limit, int) and reply.finish_reason is None and len(text_pieces) > limit:
            text_pieces, incomplete = text_pieces[:limit], "max_output_tokens"
        text = "".join(text_pieces)
        annotations: list[JSON] = []
        if files and any(item["type"] == "file_search_call" for item in output):
            file_id, filename = files[0]
            annotations.append(
                {"type": "file_citation", "file_id": file_id, "filename": filename, "index": len(text)}
            )
        pieces[len(output)] = text_pieces
        content = {"type": "output_text", "annotations": annotations, "logprobs": [], "text": text}
        output.append(
            {
                "id": p.hex_id("msg_", 50),
                "type": "message",
                "status": "incomplete" if incomplete else "completed",
                "content": [content],
                "role": "assistant",
            }
        )
    completion = sum(len(fragments) for fragments in pieces.values())
    prompt = count_input_tokens(input_items(body)) + context_tokens
    return ResponsePlan(
        model=reply.model or p.snapshot_model(str(body.get("model", ""))),
        output=output,
        pieces=pieces,
        usage=response_usage(prompt, completion, reply.usage),
        incomplete_reason=incomplete,
        stream_usage=reply.stream_usage,
    )


def _tool(tool: Mapping[str, Any]) -> JSON:
    if tool.get("type") == "function":
        defaults: JSON = {"description": None, "name": None, "parameters": None, "strict": True}
        return {"type": "function"} | defaults | dict(tool)
    if tool.get("type") == "file_search":
        ranking = {"ranker": "auto", "score_threshold": 0.0}
        defaults = {
            "filters": None,
            "max_num_results": 20,
            "ranking_options": ranking,
            "vector_store_ids": [],
        }
        return {"type": "file_search"} | defaults | dict(tool)
    return dict(tool)


def response_body(
    body: Mapping[str, Any],
    plan: ResponsePlan,
    *,
    response_id: str,
    created_at: int,
    conversation_id: str | None = None,
) -> JSON:
    """The final response object (status completed or incomplete), in OpenAI's key order."""
    reasoning = body.get("reasoning") or {}
    text = {"format": {"type": "text"}, "verbosity": "medium"} | dict(body.get("text") or {})
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "incomplete" if plan.incomplete_reason else "completed",
        "background": body.get("background") is True,
        "completed_at": created_at,
        "conversation": {"id": conversation_id} if conversation_id else None,
        "error": None,
        "incomplete_details": {"reason": plan.incomplete_reason} if plan.incomplete_reason else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": body.get("max_tool_calls"),
        "model": plan.model,
        "output": plan.output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "prompt_cache_key": body.get("prompt_cache_key"),
        "prompt_cache_retention": body.get("prompt_cache_retention"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "safety_identifier": body.get("safety_identifier"),
        "service_tier": p.answered_tier(body),
        "store": body.get("store") is not False,
        "temperature": body.get("temperature", 1.0),
        "text": text,
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": [_tool(tool) for tool in body.get("tools") or []],
        "top_logprobs": body.get("top_logprobs", 0),
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation", "disabled"),
        "usage": plan.usage,
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


def status_view(final: Mapping[str, Any], status: str) -> JSON:
    """The response as it looks before it is done (queued, in_progress) or after a cancel."""
    pending: JSON = {"output": [], "usage": None, "completed_at": None, "incomplete_details": None}
    return {**final, "status": status} | pending


def _in_progress(item: Mapping[str, Any]) -> JSON:
    empties: dict[str, JSON] = {
        "message": {"content": []},
        "function_call": {"arguments": ""},
        "file_search_call": {"queries": [], "results": None},
        "code_interpreter_call": {"code": "", "outputs": None},
    }
    empty = empties.get(item["type"], {})
    return {**copy.deepcopy(dict(item)), "status": "in_progress"} | empty


class _Emitter:
    def __init__(self, obfuscate: bool) -> None:
        self.events: list[bytes] = []
        self.lead: int | None = None
        self._obfuscate = obfuscate

    def __call__(self, type_: str, **fields: Any) -> None:
        number = len(self.events)
        event = {"type": type_, "sequence_number": number, **fields}
        if type_ in _DELTAS:
            if self.lead is None:
                self.lead = number
            if self._obfuscate:
                event["obfuscation"] = hashlib.blake2s(f"{number}".encode()).hexdigest()[
                    : 1 + number * 7 % 12
                ]
        self.events.append(b"event: " + type_.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n")


def stream_events(
    final: Mapping[str, Any], plan: ResponsePlan, *, obfuscate: bool = True, queued: bool = False
) -> tuple[list[bytes], int]:
    """The framed events of one streamed response, and how many come before the first token."""
    emit = _Emitter(obfuscate)
    emit("response.created", response=status_view(final, "queued" if queued else "in_progress"))
    if queued:
        emit("response.queued", response=status_view(final, "queued"))
    emit("response.in_progress", response=status_view(final, "in_progress"))
    for index, item in enumerate(final["output"]):
        at: JSON = {"output_index": index}
        emit("response.output_item.added", **at, item=_in_progress(item))
        at = {"item_id": item["id"], **at}
        kind = item["type"]
        if kind in ("file_search_call", "code_interpreter_call"):
            emit(f"response.{kind}.in_progress", **at)
        if kind == "file_search_call":
            emit("response.file_search_call.searching", **at)
        elif kind == "code_interpreter_call":
            emit("response.code_interpreter_call_code.delta", **at, delta=item["code"])
            emit("response.code_interpreter_call_code.done", **at, code=item["code"])
            emit("response.code_interpreter_call.interpreting", **at)
        elif kind == "function_call":
            for piece in plan.pieces.get(index, []):
                emit("response.function_call_arguments.delta", **at, delta=piece)
            emit("response.function_call_arguments.done", **at, arguments=item["arguments"])
        elif kind == "message":
            part = item["content"][0]
            at |= {"content_index": 0}
            emit("response.content_part.added", **at, part=part | {"annotations": [], "text": ""})
            for piece in plan.pieces.get(index, []):
                emit("response.output_text.delta", **at, delta=piece, logprobs=[])
            for number, annotation in enumerate(part["annotations"]):
                emit(
                    "response.output_text.annotation.added",
                    **at,
                    annotation_index=number,
                    annotation=annotation,
                )
            emit("response.output_text.done", **at, text=part["text"], logprobs=[])
            emit("response.content_part.done", **at, part=part)
            del at["content_index"]
        if kind in ("file_search_call", "code_interpreter_call"):
            emit(f"response.{kind}.completed", **at)
        emit("response.output_item.done", output_index=index, item=item)
    emit("response.incomplete" if plan.incomplete_reason else "response.completed", response=final)
    return emit.events, len(emit.events) - 1 if emit.lead is None else emit.lead
