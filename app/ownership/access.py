"""Which objects a gateway key may reach: the ones it created.

For a non-master key, a call on `/v1/<collection>/<id>[/...]` (retrieve, download, modify, cancel, delete,
sub-resources) whose object is not the key's is answered 404, as OpenAI answers an id it does not know,
and nothing goes upstream; so is a body that names another key's object (`previous_response_id`,
`input_file_id`, `file_ids`, …). What the key creates is recorded before the client sees its id. List
answers keep only the key's own objects; when none of a page is left the gateway reads on (up to
`_FILL_PAGES` upstream pages), so a page holds at most `limit` objects, possibly fewer, and paging by the
last object's id (as the SDKs do) still walks every one of them. The master key is not checked at all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson

from app.call.record import CallRecord
from app.call.who import ApiKey
from app.errors import GatewayError
from app.ownership.store import OwnerStore
from app.proxy.upstream import UpstreamResponse

# Collection path -> the kind recorded for what it creates.
_COLLECTIONS = {
    "files": "file",
    "uploads": "upload",
    "batches": "batch",
    "vector_stores": "vector_store",
    "responses": "response",
    "conversations": "conversation",
    "fine_tuning/jobs": "fine_tuning.job",
    "chat/completions": "chat.completion",
}
# Paths under a collection that name an operation, not an object (POST /v1/responses/input_tokens).
_OPERATIONS = {"responses": frozenset({"input_tokens", "compact"})}
# Upstream pages read at most for one list call whose first page held nothing of the caller's.
_FILL_PAGES = 10

_MESSAGES = {
    "file": "No such File object: {id}",
    "upload": "No such Upload object: {id}",
    "batch": "No such Batch object: {id}",
    "vector_store": "No vector store found with id '{id}'.",
    "response": "Response with id '{id}' not found.",
    "conversation": "Conversation with id '{id}' not found.",
    "fine_tuning.job": "No such FineTuningJob object: {id}",
    "chat.completion": "Chat completion with id '{id}' not found.",
}


def not_found(kind: str, resource_id: str, param: str | None = "id") -> GatewayError:
    if param == "previous_response_id":
        return GatewayError(
            404,
            f"Previous response with id '{resource_id}' not found.",
            param=param,
            code="previous_response_not_found",
        )
    return GatewayError(404, _MESSAGES[kind].format(id=resource_id), param=param)


# -- ids a request body names ------------------------------------------------------------------------

Reference = tuple[str, str, str]  # (param, kind, id)


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _content_files(items: object, param: str) -> Iterator[Reference]:
    """Files named inside messages or input items: a part's `file_id` (Responses, conversations) or its
    `file.file_id` (chat completions)."""
    for item in items if isinstance(items, list) else ():
        if not isinstance(item, dict):
            continue
        parts = item.get("content")
        for part in [item, *(parts if isinstance(parts, list) else ())]:
            if not isinstance(part, dict):
                continue
            nested = part.get("file")
            for file_id in _strings(part.get("file_id")) + _strings(
                nested.get("file_id") if isinstance(nested, dict) else None
            ):
                yield param, "file", file_id


def _response_refs(body: dict[str, Any]) -> Iterator[Reference]:
    for previous in _strings(body.get("previous_response_id")):
        yield "previous_response_id", "response", previous
    conversation = body.get("conversation")
    conversation = conversation.get("id") if isinstance(conversation, dict) else conversation
    for conversation_id in _strings(conversation):
        yield "conversation", "conversation", conversation_id
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        if isinstance(tool, dict) and tool.get("type") == "file_search":
            for store_id in _strings(tool.get("vector_store_ids")):
                yield "tools.vector_store_ids", "vector_store", store_id
    yield from _content_files(body.get("input"), "input")


def _fields(*names: str) -> Callable[[dict[str, Any]], Iterator[Reference]]:
    def refs(body: dict[str, Any]) -> Iterator[Reference]:
        for name in names:
            for file_id in _strings(body.get(name)):
                yield name, "file", file_id

    return refs


def _file_batch_refs(body: dict[str, Any]) -> Iterator[Reference]:
    yield from _fields("file_ids")(body)
    files = body.get("files")
    for entry in files if isinstance(files, list) else ():
        if isinstance(entry, dict):
            yield from (("files.file_id", "file", fid) for fid in _strings(entry.get("file_id")))


# (collection, what follows the object id) -> the ids a POST there names.
_REFERENCES: dict[tuple[str, tuple[str, ...]], Callable[[dict[str, Any]], Iterator[Reference]]] = {
    ("responses", ()): _response_refs,
    ("chat/completions", ()): lambda body: _content_files(body.get("messages"), "messages"),
    ("conversations", ()): lambda body: _content_files(body.get("items"), "items"),
    ("conversations", ("items",)): lambda body: _content_files(body.get("items"), "items"),
    ("batches", ()): _fields("input_file_id"),
    ("fine_tuning/jobs", ()): _fields("training_file", "validation_file"),
    ("vector_stores", ()): _fields("file_ids"),
    ("vector_stores", ("files",)): _fields("file_id"),
    ("vector_stores", ("file_batches",)): _file_batch_refs,
}


# -- files an object brings with it --------------------------------------------------------------------


def _batch_files(batch: dict[str, Any]) -> list[str]:
    return _strings(batch.get("output_file_id")) + _strings(batch.get("error_file_id"))


def _job_files(job: dict[str, Any]) -> list[str]:
    return _strings(job.get("result_files"))


_DERIVED: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "batches": _batch_files,
    "fine_tuning/jobs": _job_files,
}


# -- the caller and one call's plan ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Caller:
    store: OwnerStore
    key_id: str
    call: CallRecord

    async def require(self, kind: str, resource_id: str, param: str | None = "id") -> None:
        if await self.store.owner(resource_id) != self.key_id:
            raise not_found(kind, resource_id, param)

    async def check(self, references: Iterable[Reference]) -> None:
        wanted = list(references)
        if not wanted:
            return
        owners = await self.store.owners(rid for _, _, rid in wanted)
        for param, kind, resource_id in wanted:
            if owners[resource_id] != self.key_id:
                raise not_found(kind, resource_id, param)

    async def record(self, resource_ids: list[str], kind: str) -> None:
        if resource_ids:
            await self.store.record(resource_ids, kind, self.key_id, self.call.admitted.feature)


def caller(key: ApiKey | None, owners: OwnerStore, call: CallRecord) -> Caller | None:
    """The key making this call, or None for the master key (which has none), which may reach everything."""
    return None if key is None else Caller(owners, key.id, call)


def body_check(who: Caller | None, collection: str) -> Callable[[dict[str, Any]], Awaitable[None]] | None:
    """For a metered route: what refuses a body naming an object that is not the caller's."""
    if who is None:
        return None
    refs = _REFERENCES[(collection, ())]

    async def check(body: dict[str, Any]) -> None:
        await who.check(refs(body))

    return check


@dataclass(slots=True)
class Plan:
    """What ownership asks of one passthrough call by a non-master key, after its path was allowed."""

    caller: Caller
    collection: str
    query: str
    references: Callable[[dict[str, Any]], Iterator[Reference]] | None = None
    creates: str | None = None  # the kind of the object in the answer
    lists: bool = False
    completes_upload: bool = False

    @property
    def reads_body(self) -> bool:
        return self.references is not None

    @property
    def reads_answer(self) -> bool:
        return self.creates is not None or self.lists or self.completes_upload or self.collection in _DERIVED

    async def check_body(self, raw: bytes) -> None:
        assert self.references is not None
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            return  # not JSON: the upstream refuses it
        if isinstance(body, dict):
            await self.caller.check(self.references(body))

    async def settle(
        self, answer: UpstreamResponse, fetch: Callable[[str], Awaitable[bytes]]
    ) -> UpstreamResponse:
        """The answer the client may see: objects it creates recorded first, lists filtered."""
        if not self.reads_answer or answer.status >= 300:
            return answer
        if answer.stream is not None:
            # Not JSON: nothing here can be recorded or filtered, so it cannot be let through.
            await answer.stream.close()
            raise GatewayError(
                502, "The upstream's answer was not the JSON object expected.", code="bad_upstream_answer"
            )
        try:
            found: Any = orjson.loads(answer.body)
        except orjson.JSONDecodeError:
            found = None
        if not isinstance(found, dict):
            return answer
        if self.lists:
            found = await self._filtered(found, fetch)
        elif self.creates is not None and isinstance(found.get("id"), str):
            await self.caller.record([found["id"]], self.creates)
        elif self.completes_upload and isinstance(found.get("file"), dict):
            await self.caller.record(_strings(found["file"].get("id")), "file")
        derived = _DERIVED.get(self.collection)
        if derived is not None:
            objects = found["data"] if self.lists else [found]
            await self.caller.record([fid for obj in objects for fid in derived(obj)], "file")
        if not self.lists:
            return answer
        return UpstreamResponse(answer.status, answer.headers, orjson.dumps(found))

    async def _filtered(
        self, page: dict[str, Any], fetch: Callable[[str], Awaitable[bytes]]
    ) -> dict[str, Any]:
        params = parse_qsl(self.query, keep_blank_values=True)
        # Backwards paging (`before`) is one upstream page as it is: filling it would run the other way.
        fill = not any(name == "before" for name, _ in params)
        visible = await self._visible(page)
        pages = 1
        while not visible and fill and page.get("has_more") is True and pages < _FILL_PAGES:
            cursor = _cursor(page)
            if cursor is None:
                break
            query = urlencode([(n, v) for n, v in params if n != "after"] + [("after", cursor)])
            try:
                following: Any = orjson.loads(await fetch(query))
            except orjson.JSONDecodeError:
                break
            if not isinstance(following, dict):
                break
            page, pages = following, pages + 1
            visible = await self._visible(page)
        result = {**page, "data": visible}
        if "first_id" in page:
            result["first_id"] = visible[0]["id"] if visible else None
        if visible:
            if "last_id" in page:
                result["last_id"] = visible[-1]["id"]
        elif page.get("has_more") is True:
            # An empty page that is not the end carries the upstream's cursor (even in a list that has
            # no `last_id` of its own), so a client can page on.
            result["last_id"] = _cursor(page)
        elif "last_id" in page:
            result["last_id"] = None
        return result

    async def _visible(self, page: dict[str, Any]) -> list[dict[str, Any]]:
        data = page.get("data")
        items = (
            [item for item in data if isinstance(item, dict) and isinstance(item.get("id"), str)]
            if isinstance(data, list)
            else []
        )
        owners = await self.caller.store.owners(item["id"] for item in items)
        return [item for item in items if owners[item["id"]] == self.caller.key_id]


def _cursor(page: dict[str, Any]) -> str | None:
    last = page.get("last_id")
    if isinstance(last, str):
        return last
    data = page.get("data")
    tail = data[-1] if isinstance(data, list) and data else None
    return tail["id"] if isinstance(tail, dict) and isinstance(tail.get("id"), str) else None


def _split(path: str) -> tuple[str, list[str]] | None:
    segments = path.split("/")
    if segments[:2] in (["fine_tuning", "jobs"], ["chat", "completions"]):
        return "/".join(segments[:2]), segments[2:]
    if segments[0] in _COLLECTIONS:
        return segments[0], segments[1:]
    return None


async def admit(who: Caller | None, method: str, path: str, query: str) -> Plan | None:
    """Refuse (404) a call on an object that is not the caller's; else what to do with the call's body and
    answer. `path` is the part after /v1/. None: nothing to do (the master key, or not an owned kind)."""
    split = _split(path) if who is not None else None
    if who is None or split is None:
        return None
    collection, rest = split
    kind = _COLLECTIONS[collection]
    plan = Plan(who, collection, query)
    if rest and rest[0] not in _OPERATIONS.get(collection, ()):
        # An empty id too: whatever the upstream would make of it, it is no object of this key's.
        await who.require(kind, rest[0])
        under = tuple(rest[1:2])
        plan.lists = method == "GET" and (
            (collection, under) == ("vector_stores", ("files",))
            or (collection == "vector_stores" and rest[1:2] == ["file_batches"] and rest[3:] == ["files"])
        )
        plan.completes_upload = method == "POST" and collection == "uploads" and under == ("complete",)
    else:
        under = ()
        # Every collection's GET lists objects of many keys (where the upstream has such a list at all).
        plan.lists = method == "GET" and not rest
        plan.creates = kind if method == "POST" and not rest else None
    if method == "POST":
        plan.references = _REFERENCES.get((collection, under))
    return plan
