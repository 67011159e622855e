"""The fake's stateless one-body endpoints: POST /v1/embeddings, POST /v1/moderations, GET /v1/models,
GET /v1/models/{id}. Their bodies are built in ``openai_payloads``."""

from __future__ import annotations

from tests.fakes import openai_payloads as p
from tests.fakes.answers import Answer, Incoming, Router, json_body, problem_body


async def embeddings(incoming: Incoming) -> Answer:
    if (problem := p.invalid_request(incoming.json, "input")) is not None:
        return problem_body(400, problem)
    payload = p.embeddings_body(incoming.json)
    return json_body(payload, usage=payload["usage"])


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
    router.add("GET", "/v1/models", models)
    router.add("GET", "/v1/models/{id:path}", model)
