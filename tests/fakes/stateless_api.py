"""The fake's stateless one-body endpoints: POST /v1/embeddings, /v1/completions, /v1/moderations,
GET /v1/models, GET /v1/models/{id}. Their bodies are built in ``openai_payloads``."""

from __future__ import annotations

import time

from tests.fakes import openai_payloads as p
from tests.fakes.answers import Answer, Incoming, Router, json_body, problem_body


async def embeddings(incoming: Incoming) -> Answer:
    if (problem := p.invalid_request(incoming.json, "input")) is not None:
        return problem_body(400, problem)
    payload = p.embeddings_body(incoming.json)
    return json_body(payload, usage=payload["usage"])


async def completions(incoming: Incoming) -> Answer:
    """The legacy completions endpoint: not one the gateway knows, so it reaches it through passthrough."""
    if (problem := p.invalid_request(incoming.json, "prompt")) is not None:
        return problem_body(400, problem)
    body = incoming.json
    prompt_tokens = len(str(body["prompt"]).split())
    # A completion cut off at the caller's max_tokens, as a long one is; three tokens without one.
    allowed = body.get("max_tokens")
    completion_tokens = allowed if type(allowed) is int and allowed > 0 else 3
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    payload = {
        "id": p.random_id("cmpl-", 29),
        "object": "text_completion",
        "created": int(time.time()),
        "model": p.snapshot_model(body["model"]),
        "choices": [{"text": "a legacy completion", "index": 0, "logprobs": None, "finish_reason": "stop"}],
        "usage": usage,
    }
    return json_body(payload, usage=usage)


async def moderations(incoming: Incoming) -> Answer:
    body = incoming.json
    # The model is optional here.
    problem = p.invalid_request({"model": None} | body if isinstance(body, dict) else body, "input")
    if problem is not None:
        return problem_body(400, problem)
    return json_body(p.moderation_body(body))


async def models(incoming: Incoming) -> Answer:
    return json_body(p.models_body())


async def model(incoming: Incoming) -> Answer:
    name = incoming.params["id"]
    created = dict(p.LISTED_MODELS).get(name)
    if created is None:
        message = f"The model '{name}' does not exist"
        return problem_body(404, p.error(message, "invalid_request_error", "model_not_found", "model"))
    return json_body(p.model_object(name, created))


def register(router: Router) -> None:
    router.add("POST", "/v1/embeddings", embeddings)
    router.add("POST", "/v1/moderations", moderations)
    router.add("POST", "/v1/completions", completions)
    router.add("GET", "/v1/models", models)
    router.add("GET", "/v1/models/{id:path}", model)
