"""The fake upstream's server-side objects: stored responses, files, vector stores, conversations,
batches, fine-tuning jobs, uploads and stored chat completions.

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
    input_items: list[JSON] = field(default_factory=list)  # as GET .../input_items lists them

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
    content: bytes | None = None  # kept for batch input and output files; others serve made-up bytes

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
        self.batches: dict[str, Batch] = {}
        self.fine_tuning_jobs: dict[str, FineTuningJob] = {}
        self.uploads: dict[str, Upload] = {}
        self.chat_completions: dict[str, StoredCompletion] = {}
        self.polls: dict[str, int] = {}  # GET /v1/responses/{id} received, per id; kept after a DELETE

    def clear(self) -> None:
        with self.lock:
            self.responses.clear()
            self.files.clear()
            self.vector_stores.clear()
            self.conversations.clear()
            self.batches.clear()
            self.fine_tuning_jobs.clear()
            self.uploads.clear()
            self.chat_completions.clear()
            self.polls.clear()


@dataclass
class Batch:
    """A batch: ``validating`` for the first quarter of its delay, ``in_progress`` to three quarters,
    ``finalizing``, then ``completed`` with its output and error files (made when first seen complete, as
    OpenAI makes them at the end); ``failed`` at once when its input file has no request line."""

    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    metadata: JSON | None
    delay_s: float
    requests: list[JSON] = field(default_factory=list)
    created_at: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)
    cancelled_at: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    completed: int = 0
    failed: int = 0
    errors: JSON | None = None

    def status(self) -> str:
        elapsed = time.monotonic() - self.started
        if self.errors is not None:
            return "failed"
        if self.cancelled_at is not None:
            return "cancelled"
        if elapsed >= self.delay_s:
            return "completed"
        if elapsed < self.delay_s / 4:
            return "validating"
        return "in_progress" if elapsed < self.delay_s * 3 / 4 else "finalizing"

    def as_json(self) -> JSON:
        status = self.status()
        done = status == "completed"
        ended = self.created_at if done or status == "failed" else None
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": self.errors,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.created_at
            if status in ("in_progress", "finalizing", "completed")
            else None,
            "expires_at": self.created_at + 86400,
            "finalizing_at": self.created_at if status in ("finalizing", "completed") else None,
            "completed_at": ended if done else None,
            "failed_at": ended if status == "failed" else None,
            "expired_at": None,
            "cancelling_at": self.cancelled_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {
                "total": len(self.requests),
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": self.metadata,
        }


@dataclass
class FineTuningJob:
    """A job: ``validating_files``, then ``running``, then ``succeeded`` with a result file (made when
    first seen succeeded) and a fine-tuned model, over its delay."""

    id: str
    model: str
    training_file: str
    validation_file: str | None
    suffix: str | None
    metadata: JSON | None
    delay_s: float
    created_at: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    result_files: list[str] = field(default_factory=list)

    def status(self) -> str:
        elapsed = time.monotonic() - self.started
        if self.cancelled:
            return "cancelled"
        if elapsed >= self.delay_s:
            return "succeeded"
        return "validating_files" if elapsed < self.delay_s / 2 else "running"

    def as_json(self) -> JSON:
        status = self.status()
        done = status == "succeeded"
        return {
            "object": "fine_tuning.job",
            "id": self.id,
            "model": self.model,
            "created_at": self.created_at,
            "finished_at": self.created_at if done else None,
            "fine_tuned_model": f"ft:{self.model}:org:{self.suffix or 'custom'}:{self.id[-8:]}"
            if done
            else None,
            "organization_id": "org-fake",
            "result_files": list(self.result_files),
            "status": status,
            "validation_file": self.validation_file,
            "training_file": self.training_file,
            "hyperparameters": {"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 1.8},
            "trained_tokens": 5768 if done else None,
            "error": None,
            "user_provided_suffix": self.suffix,
            "seed": 42,
            "estimated_finish": None,
            "integrations": [],
            "metadata": self.metadata,
            "method": {"type": "supervised"},
        }


@dataclass
class Upload:
    """An upload in parts: the parts' sizes and sha256s, never their bytes."""

    id: str
    filename: str
    purpose: str
    bytes: int
    mime_type: str
    parts: dict[str, tuple[int, str]] = field(default_factory=dict)  # part id -> (size, sha256)
    status: str = "pending"
    file: StoredFile | None = None
    created_at: int = field(default_factory=lambda: int(time.time()))

    def as_json(self) -> JSON:
        return {
            "id": self.id,
            "object": "upload",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": self.status,
            "expires_at": self.created_at + 3600,
            "file": self.file.as_json() if self.file is not None else None,
        }


@dataclass
class StoredCompletion:
    """A chat completion made with ``store: true``."""

    completion: JSON
    metadata: JSON
    messages: list[JSON]

    def as_json(self) -> JSON:
        return {**self.completion, "metadata": self.metadata}
