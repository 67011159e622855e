"""Which endpoint class a /v1 path belongs to, and which calls can spend money: the one table both key
scopes and budgets read.

A path's class is named by its first segment after /v1/ (`/v1/vector_stores/vs_1/files` is
`vector_stores`); `threads` belongs with `assistants`, as in OpenAI's API. A segment the table does not
know is `other`: an endpoint the upstream adds later reaches only the keys granted `other`, until it is
named here.
"""

from __future__ import annotations

from collections.abc import Iterable

OTHER = "other"
# Path segment -> class.
_SEGMENTS: dict[str, str] = {
    "chat": "chat",
    "completions": "completions",
    "embeddings": "embeddings",
    "responses": "responses",
    "models": "models",
    "moderations": "moderations",
    "audio": "audio",
    "images": "images",
    "files": "files",
    "uploads": "uploads",
    "batches": "batches",
    "vector_stores": "vector_stores",
    "fine_tuning": "fine_tuning",
    "conversations": "conversations",
    "containers": "containers",
    "realtime": "realtime",
    "evals": "evals",
    "assistants": "assistants",
    "threads": "assistants",
    "videos": "videos",
    "browser_tokens": "browser_tokens",
}
CLASSES: frozenset[str] = frozenset(_SEGMENTS.values()) | {OTHER}
# A new key's classes unless it is given others: calls answered at once, paid per call and bounded by
# the budgets. Granted explicitly: the classes that keep what they are sent (files, vector stores,
# conversations…), that start work billed later, out of the call's sight (batches, fine-tuning, evals,
# videos, realtime sessions), that mint credentials (browser tokens), or that the gateway cannot name yet
# (`other`).
DEFAULT_SCOPES: tuple[str, ...] = (
    "chat",
    "completions",
    "embeddings",
    "responses",
    "models",
    "moderations",
    "audio",
    "images",
)
# The stand-in for "every class, and any added later" in the admin API and the CLI.
ALL = "*"
# Not a class of /v1 calls but a grant to read the gateway's usage reports (GET /v1/usage and the
# dashboard's data), which show every feature's and every user's spend. Never implied, neither by `*`
# nor by a key made before scopes existed: a key that calls the API must not read everyone's usage
# unless it was given this scope by name.
REPORTS = "reports"

_WRITES = frozenset({"POST", "PUT", "PATCH"})
# Writes that only stop something already paid for.
_STOPS = ("/cancel", "/pause")


def endpoint_class(path: str) -> str:
    """The class of a /v1 path, as the request's scope carries it (`/v1/files/file-1` -> `files`)."""
    segment = path[4:].partition("/")[0]
    return _SEGMENTS.get(segment, OTHER)


def spends(method: str, path: str) -> bool:
    """Whether a call the gateway does not meter up front can cost money, so a spent budget refuses it.
    Every write does (a completion, an image, a transcription, an upload that feeds a batch, a job or a
    session started) except one that cancels or pauses; reads and deletes never do. Deciding by method
    rather than by a list of endpoints keeps one the upstream adds later on the safe side; the price is
    that a spent key also cannot, say, edit a stored completion's metadata until its budget resets."""
    return method in _WRITES and not path.endswith(_STOPS)


def parse_scopes(names: Iterable[str]) -> list[str]:
    """Class names as an operator gives them, in the one spelling a key stores: sorted, or [ALL] alone
    (with REPORTS when given, since `*` does not imply it). Raises ValueError naming the unknown ones."""
    given = set(names)
    if ALL in given:
        return sorted({ALL} | (given & {REPORTS}))
    unknown = sorted(given - CLASSES - {REPORTS})
    if unknown:
        raise ValueError(
            f"unknown endpoint class(es): {', '.join(unknown)}; known: {', '.join(sorted(CLASSES))}, "
            f"'{REPORTS}' to read the usage reports, or '{ALL}' for every class"
        )
    return sorted(given)
