"""A feature's maximum prompt size: refuse an oversized chat prompt, or drop its oldest messages until it
fits.

Truncation keeps what a conversation cannot lose: every system/developer message, the last user message,
and an assistant message with tool calls together with the tool results that answer it (the API refuses
a tool result whose call is gone, and a call without its results).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.errors import bad_request
from app.metering import tokens

_KEPT_ROLES = frozenset({"system", "developer"})


@dataclass(frozen=True, slots=True)
class Fitted:
    messages: list[Any]
    prompt_tokens: int
    truncated: bool


def _groups(messages: list[Any]) -> list[list[int]]:
    """Message indices in units that are dropped together: an assistant tool call with its results."""
    groups: list[list[int]] = []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        joins_call = role == "tool" and groups and _is_tool_call(messages[groups[-1][0]])
        if joins_call:
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def _is_tool_call(message: Any) -> bool:
    return (
        isinstance(message, dict) and message.get("role") == "assistant" and bool(message.get("tool_calls"))
    )


def _protected(messages: list[Any]) -> set[int]:
    kept = {i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") in _KEPT_ROLES}
    users = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
    if users:
        kept.add(users[-1])
    return kept


def fit_prompt(model: str, body: dict[str, Any], limit: int, *, truncate: bool, feature: str) -> Fitted:
    messages: list[Any] = body["messages"]
    size = tokens.count_chat_prompt(model, body)
    if size <= limit:
        return Fitted(messages, size, truncated=False)
    if not truncate:
        raise bad_request(
            f"The prompt is {size} tokens; feature '{feature}' allows at most {limit}.",
            param="messages",
            code="prompt_too_long",
        )
    base = tokens.count_chat_prompt(model, {**body, "messages": []})
    cost = [
        tokens.count_chat_prompt(model, {"messages": [m]}) - tokens.count_chat_prompt(model, {"messages": []})
        for m in messages
    ]
    protected = _protected(messages)
    dropped: set[int] = set()
    for group in _groups(messages):
        if size <= limit:
            break
        if protected.intersection(group):
            continue
        dropped.update(group)
        size -= sum(cost[i] for i in group)
    size = max(size, base)
    if size > limit:
        raise bad_request(
            f"The prompt is {size} tokens even without its older messages; "
            f"feature '{feature}' allows at most {limit}.",
            param="messages",
            code="prompt_too_long",
        )
    return Fitted([m for i, m in enumerate(messages) if i not in dropped], size, truncated=True)
