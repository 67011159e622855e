"""The fake's Files and Vector Stores: POST/GET /v1/files, GET/DELETE /v1/files/{id}, GET .../content,
POST/GET /v1/vector_stores, GET/DELETE /v1/vector_stores/{id}, POST/GET /v1/vector_stores/{id}/files,
GET/DELETE /v1/vector_stores/{id}/files/{file_id}.

An upload is read part by part off the socket, never as a whole body: the fake counts the file's bytes and
hashes them, keeps that and the metadata, and drops the content, except for a `batch` file of at most
``KEPT_BYTES`` (the Batch API reads it). ``GET /v1/files/{id}/content`` answers a kept file's bytes, else
as many deterministic bytes (``file_content``), streamed.

A file attached to a vector store is ``in_progress`` when attached and ``completed`` once the fake's
``ingest_delay_s`` has passed (at the next read when it is 0), like OpenAI's ingestion; answers about it
carry ``openai-poll-after-ms`` so the SDK's ``create_and_poll`` polls briskly.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from aiohttp import BodyPartReader, web

from tests.fakes import openai_payloads as p
from tests.fakes.answers import Answer, Body, Download, Incoming, Router, error_body, json_body
from tests.fakes.store import STATIC_CHUNKING, FakeStore, StoredFile, VectorStore, VectorStoreFile

FILE_PURPOSES = ["assistants", "batch", "fine-tune", "vision", "user_data", "evals"]
READ_CHUNK = 256 * 1024
KEPT_BYTES = 8 * 1024 * 1024
POLL_AFTER_MS = "10"


def file_content(sha256: str, size: int, chunk: int = READ_CHUNK) -> Iterator[bytes]:
    """The bytes the fake serves for a file it stored as (sha256, size)."""
    for offset in range(0, size, chunk):
        yield hashlib.shake_256(f"{sha256}:{offset}".encode()).digest(min(chunk, size - offset))


def _listing(items: Sequence[dict[str, Any]], has_more: bool = False) -> dict[str, Any]:
    first, last = (items[0]["id"], items[-1]["id"]) if items else (None, None)
    return {"object": "list", "data": list(items), "first_id": first, "last_id": last, "has_more": has_more}


def page(items: Sequence[dict[str, Any]], query: Mapping[str, str], default_limit: int) -> dict[str, Any]:
    """One page of a cursor-paged list, as OpenAI pages: the `limit` items after the one `after` names."""
    after = query.get("after")
    ids = [item["id"] for item in items]
    start = ids.index(after) + 1 if after in ids else 0
    limit = int(query["limit"]) if query.get("limit", "").isdigit() else default_limit
    return _listing(items[start : start + limit], has_more=start + limit < len(items))


class FilesAPI:
    def __init__(self, store: FakeStore, ingest_delay: Callable[[], float]) -> None:
        self._store = store
        self._ingest_delay = ingest_delay

    def register(self, router: Router) -> None:
        router.add("POST", "/v1/files", self.upload)
        router.add("GET", "/v1/files", self.list_files)
        router.add("GET", "/v1/files/{id}", self.retrieve_file)
        router.add("GET", "/v1/files/{id}/content", self.content)
        router.add("DELETE", "/v1/files/{id}", self.delete_file)
        router.add("POST", "/v1/vector_stores", self.create_store)
        router.add("GET", "/v1/vector_stores", self.list_stores)
        router.add("GET", "/v1/vector_stores/{id}", self.retrieve_store)
        router.add("POST", "/v1/vector_stores/{id}", self.modify_store)
        router.add("DELETE", "/v1/vector_stores/{id}", self.delete_store)
        router.add("POST", "/v1/vector_stores/{id}/files", self.attach)
        router.add("GET", "/v1/vector_stores/{id}/files", self.list_attached)
        router.add("GET", "/v1/vector_stores/{id}/files/{file_id}", self.retrieve_attached)
        router.add("DELETE", "/v1/vector_stores/{id}/files/{file_id}", self.detach)

    # -- files -----------------------------------------------------------------------------------------

    async def upload(self, incoming: Incoming) -> Answer:
        request = incoming.request
        if request.content_type != "multipart/form-data":
            message = f"Invalid Content-Type header ({request.content_type}), expected multipart/form-data."
            return error_body(400, message)
        kept = bytearray()
        fields, filename, size, digest = await read_form(request, keep=kept)
        record = {
            "body_size": request.content.total_bytes,
            "upload_filename": filename,
            "upload_size": size,
            "upload_sha256": digest,
            "form": fields,
        }
        purpose = fields.get("purpose")
        problem: Body | None = None
        if filename is None or digest is None:
            message = "Missing required parameter: 'file'."
            problem = error_body(400, message, code="missing_required_parameter", param="file")
        elif purpose is None:
            message = "Missing required parameter: 'purpose'."
            problem = error_body(400, message, code="missing_required_parameter", param="purpose")
        elif purpose not in FILE_PURPOSES:
            problem = error_body(
                400, f"'{purpose}' is not one of {FILE_PURPOSES} - 'purpose'", param="purpose"
            )
        if problem is not None:
            return Body(problem.status, problem.payload, record=record)
        assert filename is not None and digest is not None and purpose is not None
        created = int(time.time())
        seconds = fields.get("expires_after[seconds]")
        stored = StoredFile(
            id=p.random_id("file-", 22),
            filename=filename,
            purpose=purpose,
            bytes=size,
            sha256=digest,
            created_at=created,
            expires_at=created + int(seconds) if seconds and seconds.isdigit() else None,
            content=bytes(kept) if purpose == "batch" and size <= KEPT_BYTES else None,
        )
        with self._store.lock:
            self._store.files[stored.id] = stored
        return Body(200, p.dump_body(stored.as_json()), record=record)

    async def list_files(self, incoming: Incoming) -> Answer:
        purpose = incoming.request.query.get("purpose")
        with self._store.lock:
            files = [f for f in self._store.files.values() if purpose in (None, f.purpose)]
        if incoming.request.query.get("order") != "asc":
            files.reverse()  # newest first; insertion order breaks created_at's ties
        return json_body(page([f.as_json() for f in files], incoming.request.query, default_limit=10000))

    async def retrieve_file(self, incoming: Incoming) -> Answer:
        stored = self._file(incoming.params["id"])
        return json_body(stored.as_json()) if stored is not None else no_file(incoming.params["id"])

    async def content(self, incoming: Incoming) -> Answer:
        stored = self._file(incoming.params["id"])
        if stored is None:
            return no_file(incoming.params["id"])
        if stored.content is not None:
            return Download(len(stored.content), [stored.content])
        return Download(stored.bytes, file_content(stored.sha256, stored.bytes))

    async def delete_file(self, incoming: Incoming) -> Answer:
        file_id = incoming.params["id"]
        with self._store.lock:
            stored = self._store.files.pop(file_id, None)
        if stored is None:
            return no_file(file_id)
        return json_body({"object": "file", "deleted": True, "id": file_id})

    def _file(self, file_id: str) -> StoredFile | None:
        with self._store.lock:
            return self._store.files.get(file_id)

    # -- vector stores ---------------------------------------------------------------------------------

    async def create_store(self, incoming: Incoming) -> Answer:
        body = incoming.json if isinstance(incoming.json, dict) else {}
        vector_store = VectorStore(
            id=p.hex_id("vs_", 32),
            name=str(body.get("name") or ""),
            metadata=body.get("metadata") or {},
            expires_after=body.get("expires_after"),
        )
        with self._store.lock:
            for file_id in body.get("file_ids") or []:
                if (problem := self._attach(vector_store, file_id, body)) is not None:
                    return problem
            self._store.vector_stores[vector_store.id] = vector_store
            payload = vector_store.as_json()
        return json_body(payload)

    async def list_stores(self, incoming: Incoming) -> Answer:
        with self._store.lock:
            stores = [s.as_json() for s in self._store.vector_stores.values()]
        return json_body(_listing(stores[::-1]))

    async def retrieve_store(self, incoming: Incoming) -> Answer:
        with self._store.lock:
            vector_store = self._store.vector_stores.get(incoming.params["id"])
            payload = vector_store.as_json() if vector_store is not None else None
        return json_body(payload) if payload is not None else _no_store(incoming.params["id"])

    async def modify_store(self, incoming: Incoming) -> Answer:
        body = incoming.json if isinstance(incoming.json, dict) else {}
        with self._store.lock:
            vector_store = self._store.vector_stores.get(incoming.params["id"])
            if vector_store is not None:
                vector_store.name = str(body.get("name", vector_store.name) or "")
                vector_store.metadata = body.get("metadata", vector_store.metadata) or {}
            payload = vector_store.as_json() if vector_store is not None else None
        return json_body(payload) if payload is not None else _no_store(incoming.params["id"])

    async def delete_store(self, incoming: Incoming) -> Answer:
        store_id = incoming.params["id"]
        with self._store.lock:
            vector_store = self._store.vector_stores.pop(store_id, None)
        if vector_store is None:
            return _no_store(store_id)
        return json_body({"id": store_id, "object": "vector_store.deleted", "deleted": True})

    async def attach(self, incoming: Incoming) -> Answer:
        body = incoming.json if isinstance(incoming.json, dict) else {}
        if "file_id" not in body:
            message = "Missing required parameter: 'file_id'."
            return error_body(400, message, code="missing_required_parameter", param="file_id")
        with self._store.lock:
            vector_store = self._store.vector_stores.get(incoming.params["id"])
            if vector_store is None:
                return _no_store(incoming.params["id"])
            if (problem := self._attach(vector_store, body["file_id"], body)) is not None:
                return problem
            payload = vector_store.files[body["file_id"]].as_json("in_progress")
        return _polled(payload)

    def _attach(self, vector_store: VectorStore, file_id: Any, body: dict[str, Any]) -> Body | None:
        stored = self._store.files.get(str(file_id))
        if stored is None:
            return error_body(404, f"No file found with id '{file_id}'.", param="file_id")
        vector_store.files[stored.id] = VectorStoreFile(
            stored,
            vector_store.id,
            self._ingest_delay(),
            attributes=body.get("attributes") or {},
            chunking_strategy=body.get("chunking_strategy") or dict(STATIC_CHUNKING),
        )
        return None

    async def list_attached(self, incoming: Incoming) -> Answer:
        with self._store.lock:
            vector_store = self._store.vector_stores.get(incoming.params["id"])
            files = [f.as_json() for f in vector_store.files.values()] if vector_store is not None else None
        if files is None:
            return _no_store(incoming.params["id"])
        return json_body(_listing(files[::-1]))

    async def retrieve_attached(self, incoming: Incoming) -> Answer:
        store_id, file_id = incoming.params["id"], incoming.params["file_id"]
        with self._store.lock:
            vector_store = self._store.vector_stores.get(store_id)
            if vector_store is None:
                return _no_store(store_id)
            attached = vector_store.files.get(file_id)
            payload = attached.as_json() if attached is not None else None
        if payload is None:
            return error_body(404, f"No file found with id '{file_id}' in vector store '{store_id}'.")
        return _polled(payload)

    async def detach(self, incoming: Incoming) -> Answer:
        store_id, file_id = incoming.params["id"], incoming.params["file_id"]
        with self._store.lock:
            vector_store = self._store.vector_stores.get(store_id)
            if vector_store is None:
                return _no_store(store_id)
            attached = vector_store.files.pop(file_id, None)
        if attached is None:
            return error_body(404, f"No file found with id '{file_id}' in vector store '{store_id}'.")
        return json_body({"id": file_id, "object": "vector_store.file.deleted", "deleted": True})


async def read_form(
    request: web.Request, file_field: str = "file", keep: bytearray | None = None
) -> tuple[dict[str, str], str | None, int, str | None]:
    """The text fields, and the file part's name, size and sha256, reading the body chunk by chunk; its
    first KEPT_BYTES in `keep`, when given."""
    fields: dict[str, str] = {}
    filename: str | None = None
    size, digest = 0, None
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            await part.release()  # a nested multipart: not something OpenAI takes
            continue
        if part.name == file_field and part.filename is not None:
            filename, hasher = part.filename, hashlib.sha256()
            while chunk := await part.read_chunk(READ_CHUNK):
                size += len(chunk)
                hasher.update(chunk)
                if keep is not None and len(keep) < KEPT_BYTES:
                    keep += chunk[: KEPT_BYTES - len(keep)]
            digest = hasher.hexdigest()
        elif part.name is not None:
            fields[part.name] = await part.text()
        else:
            await part.release()
    return fields, filename, size, digest


def _polled(payload: dict[str, Any]) -> Answer:
    body = json_body(payload)
    return Body(body.status, body.payload, headers={"openai-poll-after-ms": POLL_AFTER_MS})


def no_file(file_id: str, param: str = "id") -> Answer:
    return error_body(404, f"No such File object: {file_id}", param=param)


def _no_store(store_id: str) -> Answer:
    return error_body(404, f"No vector store found with id '{store_id}'.")
