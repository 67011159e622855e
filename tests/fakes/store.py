"""The fake upstream's server-side objects: stored responses, files, vector stores, conversations.

Thread-safe: endpoints change it on the server's loop while a test reads it from its own thread; hold
``lock`` for anything that reads more than one field. Time-driven states (a background response going
queued -> in_progress -> completed, a vector-store file finishing ingestion) are worked out from the
monotonic clock when read, so nothing runs in the background and a stopped server leaves no tasks behind.
Uploaded files keep their size and sha256, never their content.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tests.fakes import responses_payloads as rp

JSON = dict[str, Any]

STATIC_CHUNKING = {"type": "static", "static": {"max_chunk_size_tokens": 800, "chunk_overlap_tokens": 400}}


@dataclass
class StoredResponse:
    final: JSON  # the response as it is once done (completed or incomplete)
    background: bool
    delay_s: float  # background only: queued for the first half, in_progress for the second
    started: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    def status(self, now: float | None = None) -> str:
        elapsed = (time.monotonic() if now is None else now) - self.started
        if self.cancelled:
            return "cancelled"
        if not self.background or elapsed >= self.delay_s:
            return str(self.final["status"])
        return "queued" if elapsed < self.delay_s / 2 else "in_progress"

    def view(self) -> JSON:
        status = self.status()
        return self.final if status == self.final["status"] else rp.status_view(self.final, status)


@dataclass(frozen=True)
class StoredFile:
    id: str
    filename: str
    purpose: str
    bytes: int
    sha256: str
    created_at: int
    expires_at: int | None = None

    def as_json(self) -> JSON:
        return {
            "object": "file",
            "id": self.id,
            "purpose": self.purpose,
            "filename": self.filename,
            "bytes": self.bytes,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "status": "processed",
            "status_details": None,
        }


@dataclass
class VectorStoreFile:
    file: StoredFile
    vector_store_id: str
    delay_s: float  # ingestion time
    attributes: JSON = field(default_factory=dict)
    chunking_strategy: JSON = field(default_factory=lambda: dict(STATIC_CHUNKING))
    created_at: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)

    def status(self) -> str:
        return "completed" if time.monotonic() - self.started >= self.delay_s else "in_progress"

    def as_json(self, status: str | None = None) -> JSON:
        status = status or self.status()
        return {
            "id": self.file.id,
            "object": "vector_store.file",
            "usage_bytes": self.file.bytes if status == "completed" else 0,
            "created_at": self.created_at,
            "vector_store_id": self.vector_store_id,
            "status": status,
            "last_error": None,
            "chunking_strategy": self.chunking_strategy,
            "attributes": self.attributes,
        }


@dataclass
class VectorStore:
    id: str
    name: str
    metadata: JSON
    expires_after: JSON | None
    files: dict[str, VectorStoreFile] = field(default_factory=dict)
    created_at: int = field(default_factory=lambda: int(time.time()))

    def as_json(self) -> JSON:
        statuses = [f.status() for f in self.files.values()]
        done = statuses.count("completed")
        counts = {"in_progress": len(statuses) - done, "completed": done, "failed": 0, "cancelled": 0}
        return {
            "id": self.id,
            "object": "vector_store",
            "created_at": self.created_at,
            "name": self.name,
            "usage_bytes": sum(
                f.file.bytes for f, s in zip(self.files.values(), statuses, strict=True) if s == "completed"
            ),
            "file_counts": counts | {"total": len(statuses)},
            "status": "in_progress" if counts["in_progress"] else "completed",
            "expires_after": self.expires_after,
            "expires_at": None,
            "last_active_at": self.created_at,
            "metadata": self.metadata,
        }


@dataclass
class Conversation:
    id: str
    metadata: JSON
    context_tokens: int  # what continuing it bills again: its items' tokens so far
    created_at: int = field(default_factory=lambda: int(time.time()))

    def as_json(self) -> JSON:
        return {
            "id": self.id,
            "object": "conversation",
            "created_at": self.created_at,
            "metadata": self.metadata,
        }


class FakeStore:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.responses: dict[str, StoredResponse] = {}
        self.files: dict[str, StoredFile] = {}
        self.vector_stores: dict[str, VectorStore] = {}
        self.conversations: dict[str, Conversation] = {}
        self.polls: dict[str, int] = {}  # GET /v1/responses/{id} received, per id; kept after a DELETE

    def clear(self) -> None:
        with self.lock:
            self.responses.clear()
            self.files.clear()
            self.vector_stores.clear()
            self.conversations.clear()
            self.polls.clear()
