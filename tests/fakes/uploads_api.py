"""The fake's Uploads API: POST /v1/uploads, POST /v1/uploads/{id}/parts (multipart ``data``), POST
.../complete (``part_ids``), POST .../cancel. Parts are read off the socket and kept as their size and
sha256; completing an upload makes a file of the parts' total size whose sha256 is that of the parts'
digests in order (the fake serves a file's content from its size and digest, never stores it)."""

from __future__ import annotations

import hashlib
import time

from tests.fakes import openai_payloads as p
from tests.fakes.answers import Answer, Incoming, Router, error_body, json_body
from tests.fakes.files_api import FILE_PURPOSES, read_form
from tests.fakes.store import FakeStore, StoredFile, Upload


class UploadsAPI:
    def __init__(self, store: FakeStore) -> None:
        self._store = store

    def register(self, router: Router) -> None:
        router.add("POST", "/v1/uploads", self.create)
        router.add("POST", "/v1/uploads/{id}/parts", self.add_part)
        router.add("POST", "/v1/uploads/{id}/complete", self.complete)
        router.add("POST", "/v1/uploads/{id}/cancel", self.cancel)

    async def create(self, incoming: Incoming) -> Answer:
        body = incoming.json if isinstance(incoming.json, dict) else {}
        for name in ("filename", "purpose", "bytes", "mime_type"):
            if name not in body:
                message = f"Missing required parameter: '{name}'."
                return error_body(400, message, code="missing_required_parameter", param=name)
        if body["purpose"] not in FILE_PURPOSES:
            return error_body(
                400, f"'{body['purpose']}' is not one of {FILE_PURPOSES} - 'purpose'", param="purpose"
            )
        upload = Upload(
            id=p.random_id("upload_", 24),
            filename=str(body["filename"]),
            purpose=str(body["purpose"]),
            bytes=int(body["bytes"]),
            mime_type=str(body["mime_type"]),
        )
        with self._store.lock:
            self._store.uploads[upload.id] = upload
        return json_body(upload.as_json())

    async def add_part(self, incoming: Incoming) -> Answer:
        _, _, size, digest = await read_form(incoming.request, file_field="data")
        if digest is None:
            return error_body(
                400, "Missing required parameter: 'data'.", code="missing_required_parameter", param="data"
            )
        part_id = p.random_id("part_", 24)
        with self._store.lock:
            upload = self._store.uploads.get(incoming.params["id"])
            if upload is None:
                return _no_upload(incoming.params["id"])
            if upload.status != "pending":
                return error_body(400, f"Upload {upload.id} is already {upload.status}.")
            upload.parts[part_id] = (size, digest)
        return json_body(
            {"id": part_id, "object": "upload.part", "created_at": int(time.time()), "upload_id": upload.id}
        )

    async def complete(self, incoming: Incoming) -> Answer:
        body = incoming.json if isinstance(incoming.json, dict) else {}
        part_ids = body.get("part_ids")
        if not isinstance(part_ids, list):
            return error_body(
                400,
                "Missing required parameter: 'part_ids'.",
                code="missing_required_parameter",
                param="part_ids",
            )
        with self._store.lock:
            upload = self._store.uploads.get(incoming.params["id"])
            if upload is None:
                return _no_upload(incoming.params["id"])
            if upload.status != "pending":
                return error_body(400, f"Upload {upload.id} is already {upload.status}.")
            unknown = [part for part in part_ids if part not in upload.parts]
            if unknown:
                return error_body(400, f"Invalid part id: {unknown[0]}.", param="part_ids")
            size = sum(upload.parts[part][0] for part in part_ids)
            if size != upload.bytes:
                message = (
                    f"The parts add up to {size} bytes, not the {upload.bytes} the upload was created with."
                )
                return error_body(400, message, param="part_ids")
            digest = hashlib.sha256("".join(upload.parts[part][1] for part in part_ids).encode()).hexdigest()
            upload.file = StoredFile(
                id=p.random_id("file-", 22),
                filename=upload.filename,
                purpose=upload.purpose,
                bytes=size,
                sha256=digest,
                created_at=int(time.time()),
            )
            self._store.files[upload.file.id] = upload.file
            upload.status = "completed"
            payload = upload.as_json()
        return json_body(payload)

    async def cancel(self, incoming: Incoming) -> Answer:
        with self._store.lock:
            upload = self._store.uploads.get(incoming.params["id"])
            if upload is None:
                return _no_upload(incoming.params["id"])
            if upload.status == "pending":
                upload.status = "cancelled"
            payload = upload.as_json()
        return json_body(payload)


def _no_upload(upload_id: str) -> Answer:
    return error_body(404, f"No such Upload object: {upload_id}", param="upload_id")
