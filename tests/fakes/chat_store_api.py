"""The fake's stored chat completions: a chat completion made with ``store: true`` is kept, and served
by GET /v1/chat/completions (paged, newest first), GET/POST/DELETE /v1/chat/completions/{id} and GET
.../messages, as OpenAI serves them. A stored completion keeps its answer, metadata and request messages."""

from __future__ import annotations

from typing import Any

from tests.fakes.answers import Answer, Incoming, Router, error_body, json_body
from tests.fakes.files_api import page
from tests.fakes.store import FakeStore, StoredCompletion


class ChatStoreAPI:
    def __init__(self, store: FakeStore) -> None:
        self._store = store

    def register(self, router: Router) -> None:
        router.add("GET", "/v1/chat/completions", self.list_completions)
        router.add("GET", "/v1/chat/completions/{id}", self.retrieve)
        router.add("POST", "/v1/chat/completions/{id}", self.update)
        router.add("DELETE", "/v1/chat/completions/{id}", self.delete)
        router.add("GET", "/v1/chat/completions/{id}/messages", self.messages)

    def keep(self, request: dict[str, Any], completion: dict[str, Any]) -> None:
        with self._store.lock:
            self._store.chat_completions[completion["id"]] = StoredCompletion(
                completion, request.get("metadata") or {}, list(request.get("messages") or [])
            )

    async def list_completions(self, incoming: Incoming) -> Answer:
        with self._store.lock:
            kept = [c.as_json() for c in self._store.chat_completions.values()]
        return json_body(page(kept[::-1], incoming.request.query, default_limit=20))

    async def retrieve(self, incoming: Incoming) -> Answer:
        with self._store.lock:
            kept = self._store.chat_completions.get(incoming.params["id"])
            payload = kept.as_json() if kept is not None else None
        return json_body(payload) if payload is not None else _not_found(incoming.params["id"])

    async def update(self, incoming: Incoming) -> Answer:
        body = incoming.json if isinstance(incoming.json, dict) else {}
        with self._store.lock:
            kept = self._store.chat_completions.get(incoming.params["id"])
            if kept is not None:
                kept.metadata = body.get("metadata") or {}
            payload = kept.as_json() if kept is not None else None
        return json_body(payload) if payload is not None else _not_found(incoming.params["id"])

    async def delete(self, incoming: Incoming) -> Answer:
        completion_id = incoming.params["id"]
        with self._store.lock:
            kept = self._store.chat_completions.pop(completion_id, None)
        if kept is None:
            return _not_found(completion_id)
        return json_body({"object": "chat.completion.deleted", "id": completion_id, "deleted": True})

    async def messages(self, incoming: Incoming) -> Answer:
        completion_id = incoming.params["id"]
        with self._store.lock:
            kept = self._store.chat_completions.get(completion_id)
            messages = list(kept.messages) if kept is not None else None
        if messages is None:
            return _not_found(completion_id)
        listed = [
            {"id": f"{completion_id}-{index}", **message}
            for index, message in enumerate(messages)
            if isinstance(message, dict)
        ]
        return json_body(page(listed, incoming.request.query, default_limit=20))


def _not_found(completion_id: str) -> Answer:
    return error_body(404, f"Completion with id '{completion_id}' not found.")
