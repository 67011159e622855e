"""The fake's Batch and Fine-tuning APIs: POST/GET /v1/batches, GET /v1/batches/{id}, POST .../cancel;
POST/GET /v1/fine_tuning/jobs, GET /v1/fine_tuning/jobs/{id}, POST .../cancel, GET .../events.

Both run on the clock, as background responses do (``store``): a batch completes, and a job succeeds,
once the fake's ``job_delay_s`` has passed; the output or result file it yields is put in the fake's files
when the finished object is first read. Lists page like OpenAI's (``after``, ``limit``, newest first).

A batch reads its input file's request lines (``custom_id``, ``method``, ``url``, ``body``) when created;
when it completes, each line gets a line in its output file, ``{"id", "custom_id", "response":
{"status_code", "request_id", "body"}, "error": null}``, the body being what the endpoint would answer
(with its usage), or, for a request whose model starts with ``fail``, a line in its error file with a 404
error body. An input file without a request line fails the batch (``errors``), as OpenAI's validation does.

Deliberate divergences from OpenAI: a batch of any endpoint other than embeddings is answered with chat
completions; a job trains on nothing and its events are the two the fake makes up.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson

from tests.fakes import openai_payloads as p
from tests.fakes.answers import Answer, Incoming, Router, error_body, json_body
from tests.fakes.files_api import no_file, page
from tests.fakes.store import Batch, FakeStore, FineTuningJob, StoredFile

BATCH_ENDPOINTS = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
)


class JobsAPI:
    def __init__(self, store: FakeStore, delay: Callable[[], float], answering: threading.Event) -> None:
        self._store = store
        self._delay = delay
        # A fault for crash tests: while cleared, a batch is created and its answer held back.
        self._answering = answering

    def register(self, router: Router) -> None:
        router.add("POST", "/v1/batches", self.create_batch)
        router.add("GET", "/v1/batches", self.list_batches)
        router.add("GET", "/v1/batches/{id}", self.retrieve_batch)
        router.add("POST", "/v1/batches/{id}/cancel", self.cancel_batch)
        router.add("POST", "/v1/fine_tuning/jobs", self.create_job)
        router.add("GET", "/v1/fine_tuning/jobs", self.list_jobs)
        router.add("GET", "/v1/fine_tuning/jobs/{id}", self.retrieve_job)
        router.add("POST", "/v1/fine_tuning/jobs/{id}/cancel", self.cancel_job)
        router.add("GET", "/v1/fine_tuning/jobs/{id}/events", self.job_events)

    # -- batches ---------------------------------------------------------------------------------------

    async def create_batch(self, incoming: Incoming) -> Answer:
        body = incoming.json if isinstance(incoming.json, dict) else {}
        for name in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(body.get(name), str):
                message = f"Missing required parameter: '{name}'."
                return error_body(400, message, code="missing_required_parameter", param=name)
        if body["endpoint"] not in BATCH_ENDPOINTS:
            return error_body(400, f"Invalid value for 'endpoint': {body['endpoint']}.", param="endpoint")
        with self._store.lock:
            input_file = self._store.files.get(body["input_file_id"])
            if input_file is None:
                return no_file(body["input_file_id"], "input_file_id")
            requests = _request_lines(input_file.content or b"")
            batch = Batch(
                id=p.hex_id("batch_", 32),
                endpoint=body["endpoint"],
                input_file_id=body["input_file_id"],
                completion_window=body["completion_window"],
                metadata=body.get("metadata"),
                delay_s=self._delay(),
                requests=requests,
                errors=None if requests else _empty_input(),
            )
            self._store.batches[batch.id] = batch
            payload = batch.as_json()
        if not self._answering.is_set():
            await asyncio.to_thread(self._answering.wait)
        return json_body(payload)

    async def list_batches(self, incoming: Incoming) -> Answer:
        with self._store.lock:
            batches = [self._batch_view(b) for b in self._store.batches.values()]
        return json_body(page(batches[::-1], incoming.request.query, default_limit=20))

    async def retrieve_batch(self, incoming: Incoming) -> Answer:
        with self._store.lock:
            batch = self._store.batches.get(incoming.params["id"])
            payload = self._batch_view(batch) if batch is not None else None
        return json_body(payload) if payload is not None else _no_batch(incoming.params["id"])

    async def cancel_batch(self, incoming: Incoming) -> Answer:
        with self._store.lock:
            batch = self._store.batches.get(incoming.params["id"])
            if batch is None:
                return _no_batch(incoming.params["id"])
            if batch.status() in ("validating", "in_progress"):
                batch.cancelled_at = int(time.time())
            payload = self._batch_view(batch)
        return json_body(payload)

    def _batch_view(self, batch: Batch) -> dict[str, Any]:
        """Under the store's lock."""
        if batch.status() == "completed" and batch.output_file_id is None and batch.error_file_id is None:
            self._finish(batch)
        return batch.as_json()

    def _finish(self, batch: Batch) -> None:
        """Under the store's lock: answer every request line, into the output or the error file."""
        answered: list[bytes] = []
        failed: list[bytes] = []
        for request in batch.requests:
            status, answer = _answer(batch.endpoint, request.get("body"))
            line = {
                "id": p.hex_id("batch_req_", 32),
                "custom_id": request.get("custom_id"),
                "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": answer},
                "error": None,
            }
            (answered if status == 200 else failed).append(orjson.dumps(line) + b"\n")
        batch.completed, batch.failed = len(answered), len(failed)
        if answered:
            batch.output_file_id = self._new_file(
                f"batch_{batch.id}_output.jsonl", "batch_output", batch.id, b"".join(answered)
            )
        if failed:
            batch.error_file_id = self._new_file(
                f"batch_{batch.id}_error.jsonl", "batch_output", batch.id, b"".join(failed)
            )

    # -- fine-tuning -----------------------------------------------------------------------------------

    async def create_job(self, incoming: Incoming) -> Answer:
        body = incoming.json if isinstance(incoming.json, dict) else {}
        for name in ("model", "training_file"):
            if not isinstance(body.get(name), str):
                message = f"Missing required parameter: '{name}'."
                return error_body(400, message, code="missing_required_parameter", param=name)
        with self._store.lock:
            for name in ("training_file", "validation_file"):
                file_id = body.get(name)
                if file_id is not None and file_id not in self._store.files:
                    return error_body(400, f"invalid training_file: {file_id}", param=name)
            job = FineTuningJob(
                id=p.random_id("ftjob-", 24),
                model=body["model"],
                training_file=body["training_file"],
                validation_file=body.get("validation_file"),
                suffix=body.get("suffix"),
                metadata=body.get("metadata"),
                delay_s=self._delay(),
            )
            self._store.fine_tuning_jobs[job.id] = job
            payload = job.as_json()
        return json_body(payload)

    async def list_jobs(self, incoming: Incoming) -> Answer:
        with self._store.lock:
            jobs = [self._job_view(j) for j in self._store.fine_tuning_jobs.values()]
        listed = page(jobs[::-1], incoming.request.query, default_limit=20)
        # OpenAI's list of jobs carries no first_id / last_id.
        return json_body({"object": "list", "data": listed["data"], "has_more": listed["has_more"]})

    async def retrieve_job(self, incoming: Incoming) -> Answer:
        with self._store.lock:
            job = self._store.fine_tuning_jobs.get(incoming.params["id"])
            payload = self._job_view(job) if job is not None else None
        return json_body(payload) if payload is not None else _no_job(incoming.params["id"])

    async def cancel_job(self, incoming: Incoming) -> Answer:
        with self._store.lock:
            job = self._store.fine_tuning_jobs.get(incoming.params["id"])
            if job is None:
                return _no_job(incoming.params["id"])
            job.cancelled = job.cancelled or job.status() in ("validating_files", "running")
            payload = self._job_view(job)
        return json_body(payload)

    async def job_events(self, incoming: Incoming) -> Answer:
        with self._store.lock:
            job = self._store.fine_tuning_jobs.get(incoming.params["id"])
            status = job.status() if job is not None else None
        if job is None:
            return _no_job(incoming.params["id"])
        events = [
            {
                "object": "fine_tuning.job.event",
                "id": f"ftevent-{job.id[-12:]}{index}",
                "created_at": job.created_at,
                "level": "info",
                "message": message,
                "data": {},
                "type": "message",
            }
            for index, message in enumerate(["Validating training file", f"Job is {status}"])
        ]
        return json_body({"object": "list", "data": events[::-1], "has_more": False})

    def _job_view(self, job: FineTuningJob) -> dict[str, Any]:
        """Under the store's lock."""
        if job.status() == "succeeded" and not job.result_files:
            job.result_files.append(self._new_file("step_metrics.csv", "fine-tune-results", job.id))
        return job.as_json()

    def _new_file(self, filename: str, purpose: str, seed: str, content: bytes | None = None) -> str:
        """Under the store's lock."""
        stored = StoredFile(
            id=p.random_id("file-", 22),
            filename=filename,
            purpose=purpose,
            bytes=128 if content is None else len(content),
            sha256=hashlib.sha256(seed.encode()).hexdigest(),
            created_at=int(time.time()),
            content=content,
        )
        self._store.files[stored.id] = stored
        return stored.id


def _request_lines(content: bytes) -> list[dict[str, Any]]:
    requests: list[dict[str, Any]] = []
    for line in content.splitlines():
        try:
            request = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(request, dict) and isinstance(request.get("custom_id"), str):
            requests.append(request)
    return requests


def _empty_input() -> dict[str, Any]:
    error = {"code": "empty_file", "message": "The batch input file is empty.", "param": None, "line": None}
    return {"object": "list", "data": [error]}


def _answer(endpoint: str, body: object) -> tuple[int, dict[str, Any]]:
    """What the endpoint answers a batch request: (status, body)."""
    sent: dict[str, Any] = body if isinstance(body, dict) else {}
    model = sent.get("model")
    if isinstance(model, str) and model.startswith("fail"):
        message = f"The model `{model}` does not exist or you do not have access to it."
        return 404, p.error(message, "invalid_request_error", "model_not_found")
    if endpoint == "/v1/embeddings":
        return 200, p.embeddings_body(sent)
    plan = p.plan_reply(sent, None)
    return 200, p.completion_body(plan, p.random_id("chatcmpl-", 29), int(time.time()))


def _no_batch(batch_id: str) -> Answer:
    return error_body(404, f"No batch found with id '{batch_id}'.")


def _no_job(job_id: str) -> Answer:
    return error_body(404, f"Could not find fine-tune job: {job_id}", param="fine_tune_id")
