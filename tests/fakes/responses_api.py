"""The fake's Responses API and Conversations: POST/GET/DELETE /v1/responses[/{id}], POST .../cancel,
POST /v1/conversations, GET/DELETE /v1/conversations/{id}.

A response is stored unless the request says ``store: false``, and can then be retrieved, continued with
``previous_response_id``, cancelled (background ones) and deleted. ``background: true`` answers at once
with status ``queued``; the stored response turns ``in_progress`` after half the fake's
``background_delay_s`` and ``completed`` (with its output and usage) after all of it.

Deliberate divergences from OpenAI:
- a ``file_search`` tool on a vector store id the fake has never seen finds one made-up file
  (``file-fake000…``, ``document.pdf``), so a test need not create a vector store first; a vector store
  the fake knows cites its first file, or nothing when it has none;
- a cancelled response keeps no partial output; ``include``, ``stream=true`` and ``starting_after`` on
  GET are ignored (the JSON object is returned); GET .../input_items lists the request's own input as
  messages, on one page.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tests.fakes import openai_payloads as p
from tests.fakes import responses_payloads as rp
from tests.fakes.answers import Answer, Body, Events, Incoming, Router, error_body, json_body, problem_body
from tests.fakes.store import Conversation, FakeStore, StoredResponse

PLACEHOLDER_FILE = ("file-fake0000000000000000", "document.pdf")


class ResponsesAPI:
    def __init__(
        self,
        store: FakeStore,
        take_reply: Callable[[], p.Reply | None],
        background_delay: Callable[[], float],
    ) -> None:
        self._store = store
        self._take_reply = take_reply
        self._background_delay = background_delay

    def register(self, router: Router) -> None:
        router.add("POST", "/v1/responses", self.create)
        router.add("GET", "/v1/responses/{id}", self.retrieve)
        router.add("DELETE", "/v1/responses/{id}", self.delete)
        router.add("POST", "/v1/responses/{id}/cancel", self.cancel)
        router.add("GET", "/v1/responses/{id}/input_items", self.input_items)
        router.add("POST", "/v1/conversations", self.create_conversation)
        router.add("GET", "/v1/conversations/{id}", self.retrieve_conversation)
        router.add("POST", "/v1/conversations/{id}", self.update_conversation)
        router.add("DELETE", "/v1/conversations/{id}", self.delete_conversation)

    async def create(self, incoming: Incoming) -> Answer:
        body = incoming.json
        if (problem := p.invalid_request(body, "model")) is not None:
            return problem_body(400, problem)
        assert isinstance(body, dict)
        conversation = body.get("conversation")
        conversation_id = conversation.get("id") if isinstance(conversation, dict) else conversation
        with self._store.lock:
            context = self._context(body, conversation_id)
            files = self._searchable_files(body)
        if isinstance(context, Body):
            return context
        plan = rp.plan_response(body, self._take_reply(), context_tokens=context, files=files)
        final = rp.response_body(
            body,
            plan,
            response_id=p.hex_id("resp_", 50),
            created_at=int(time.time()),
            conversation_id=conversation_id,
        )
        background, streamed = body.get("background") is True, body.get("stream") is True
        with self._store.lock:
            if body.get("store") is not False:
                # A streamed background response is done when its stream is.
                delay = self._background_delay() if background and not streamed else 0.0
                stored = StoredResponse(final, background, delay, input_items=_input_items(body.get("input")))
                self._store.responses[final["id"]] = stored
            if conversation_id and (thread := self._store.conversations.get(conversation_id)) is not None:
                thread.context_tokens = rp.context_tokens(plan.usage)
        if streamed:
            usage = plan.usage if plan.stream_usage is not False else None
            obfuscate = (body.get("stream_options") or {}).get("include_obfuscation") is not False
            events, lead = rp.stream_events(
                final | {"usage": usage}, plan, obfuscate=obfuscate, queued=background
            )
            return Events(events, usage, tokens=int(plan.usage["input_tokens"]), lead=lead)
        if background:
            return json_body(rp.status_view(final, "queued"))
        return json_body(final, usage=plan.usage, pieces=sum(len(f) for f in plan.pieces.values()))

    def _context(self, body: dict[str, Any], conversation_id: str | None) -> int | Body:
        """The tokens of what the response continues (billed again as input), or why it cannot be made."""
        previous = body.get("previous_response_id")
        if previous and conversation_id:
            message = (
                "Mutually exclusive parameters: Ensure you are only providing one of: "
                "'previous_response_id' or 'conversation'."
            )
            return error_body(400, message, code="mutually_exclusive_parameters")
        if body.get("background") is True and body.get("store") is False:
            return error_body(400, "Background mode requires 'store' to be true.", param="background")
        if previous:
            continued = self._store.responses.get(str(previous))
            if continued is None:
                message = f"Previous response with id '{previous}' not found."
                code, param = "previous_response_not_found", "previous_response_id"
                return error_body(404, message, code=code, param=param)
            return rp.context_tokens(continued.final["usage"])
        if conversation_id:
            thread = self._store.conversations.get(conversation_id)
            if thread is None:
                message = f"Conversation with id '{conversation_id}' not found."
                return error_body(404, message, param="conversation")
            return thread.context_tokens
        return 0

    def _searchable_files(self, body: dict[str, Any]) -> list[tuple[str, str]]:
        files: list[tuple[str, str]] = []
        for tool in body.get("tools") or []:
            for store_id in tool.get("vector_store_ids") or [] if tool.get("type") == "file_search" else []:
                vector_store = self._store.vector_stores.get(store_id)
                if vector_store is None:
                    files.append(PLACEHOLDER_FILE)
                else:
                    files += [(f.file.id, f.file.filename) for f in vector_store.files.values()]
        return files

    async def retrieve(self, incoming: Incoming) -> Answer:
        response_id = incoming.params["id"]
        with self._store.lock:
            self._store.polls[response_id] = self._store.polls.get(response_id, 0) + 1
            stored = self._store.responses.get(response_id)
            view = stored.view() if stored is not None else None
        if view is None:
            return _not_found(response_id)
        return json_body(view, usage=view["usage"])

    async def cancel(self, incoming: Incoming) -> Answer:
        response_id = incoming.params["id"]
        with self._store.lock:
            stored = self._store.responses.get(response_id)
            if stored is None:
                return _not_found(response_id)
            if not stored.background:
                return error_body(400, "Cannot cancel a synchronous response.")
            # Cancelling twice, or a response already done, answers the response as it is.
            stored.cancelled = stored.cancelled or stored.status() in ("queued", "in_progress")
            view = stored.view()
        return json_body(view, usage=view["usage"])

    async def input_items(self, incoming: Incoming) -> Answer:
        with self._store.lock:
            stored = self._store.responses.get(incoming.params["id"])
            items = list(stored.input_items) if stored is not None else None
        if items is None:
            return _not_found(incoming.params["id"])
        first, last = (items[0]["id"], items[-1]["id"]) if items else (None, None)
        return json_body(
            {"object": "list", "data": items, "first_id": first, "last_id": last, "has_more": False}
        )

    async def delete(self, incoming: Incoming) -> Answer:
        response_id = incoming.params["id"]
        with self._store.lock:
            stored = self._store.responses.pop(response_id, None)
        if stored is None:
            return _not_found(response_id)
        return json_body({"id": response_id, "object": "response", "deleted": True})

    async def create_conversation(self, incoming: Incoming) -> Answer:
        body = incoming.json if isinstance(incoming.json, dict) else {}
        items = body.get("items") or []
        conversation = Conversation(
            id=p.hex_id("conv_", 48),
            metadata=body.get("metadata") or {},
            context_tokens=rp.count_input_tokens(items if isinstance(items, list) else []),
        )
        with self._store.lock:
            self._store.conversations[conversation.id] = conversation
        return json_body(conversation.as_json())

    async def retrieve_conversation(self, incoming: Incoming) -> Answer:
        with self._store.lock:
            conversation = self._store.conversations.get(incoming.params["id"])
        if conversation is None:
            return _conversation_not_found(incoming.params["id"])
        return json_body(conversation.as_json())

    async def update_conversation(self, incoming: Incoming) -> Answer:
        body = incoming.json if isinstance(incoming.json, dict) else {}
        with self._store.lock:
            conversation = self._store.conversations.get(incoming.params["id"])
            if conversation is not None:
                conversation.metadata = body.get("metadata") or {}
        if conversation is None:
            return _conversation_not_found(incoming.params["id"])
        return json_body(conversation.as_json())

    async def delete_conversation(self, incoming: Incoming) -> Answer:
        conversation_id = incoming.params["id"]
        with self._store.lock:
            conversation = self._store.conversations.pop(conversation_id, None)
        if conversation is None:
            return _conversation_not_found(conversation_id)
        return json_body({"id": conversation_id, "object": "conversation.deleted", "deleted": True})


def _input_items(given: Any) -> list[dict[str, Any]]:
    """The input as OpenAI lists it back: a string is one user message; each item gets an id."""
    items = [{"role": "user", "content": given}] if isinstance(given, str) else given
    listed = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        content = item.get("content")
        if isinstance(content, str):
            content = [{"type": "input_text", "text": content}]
        message = {
            "type": "message",
            "role": item.get("role", "user"),
            "content": content,
            "status": "completed",
        }
        listed.append({"id": p.hex_id("msg_", 50), **message})
    return listed[::-1]  # newest first, as the default order is


def _not_found(response_id: str) -> Answer:
    return error_body(404, f"Response with id '{response_id}' not found.")


def _conversation_not_found(conversation_id: str) -> Answer:
    return error_body(404, f"Conversation with id '{conversation_id}' not found.")
