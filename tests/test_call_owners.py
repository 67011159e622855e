"""Each part of the call record is written only by the modules that own it (app/call/record.py says who).

The writes are read from the source with `ast`: an assignment to `<something>.admitted.<field>` or
`<something>.outcome.<field>`, or to a field through a name bound to one of those parts
(`who = call.admitted`). The record is then only read by the access log, metering and tracing.
"""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

from app.call.record import Admitted, CallRecord, Outcome

APP = Path(__file__).resolve().parent.parent / "app"

_WHO = ("app.access.auth", "app.access.attribution", "app.routes.responses")
_WHAT = ("app.routes.metered", "app.routes.passthrough", "app.routes.responses")
_LIMITS = ("app.routes.metered", "app.routes.passthrough", "app.routes.deps", "app.routes.responses")
_METERING = ("app.metering.middleware",)

OWNERS: dict[str, dict[str, tuple[str, ...]]] = {
    "admitted": {
        **dict.fromkeys(("key", "api_key_id", "browser_token", "feature", "user_id"), _WHO),
        **dict.fromkeys(("endpoint", "model", "stream", "request_body", "metered_only_with_usage"), _WHAT),
        **dict.fromkeys(("admission", "prompt_truncated"), _LIMITS),
    },
    "outcome": {
        **{f.name: ("app.proxy.", "app.wire.") for f in fields(Outcome)},
        "status_code": ("app.edge.request_context", "app.proxy."),
        **dict.fromkeys(("metered_usage", "cost_units", "pending_metering"), _METERING),
    },
    "record": {
        **{f.name: ("app.edge.request_context",) for f in fields(CallRecord)},
        "route": ("app.proxy.hot_routes",),
    },
}
_PARTS = {"admitted", "outcome"}
_RECORD_ONLY = {f.name for f in fields(CallRecord)} - _PARTS - {f.name for f in fields(Admitted)}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(APP.parent).with_suffix("").parts)


def _targets(node: ast.AST) -> list[ast.expr]:
    if isinstance(node, ast.Assign):
        found = list(node.targets)
    elif isinstance(node, ast.AugAssign | ast.AnnAssign):
        found = [node.target]
    else:
        return []
    flat: list[ast.expr] = []
    while found:
        target = found.pop()
        if isinstance(target, ast.Tuple):
            found.extend(target.elts)
        else:
            flat.append(target)
    return flat


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Names bound to a part of the record: `who = call.admitted`, `a, o = call.admitted, call.outcome`."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assign):
            continue
        pairs: list[tuple[ast.expr, ast.expr]] = []
        for target in node.targets:
            if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                pairs.extend(zip(target.elts, node.value.elts, strict=False))
            else:
                pairs.append((target, node.value))
        for target, value in pairs:
            if isinstance(target, ast.Name) and isinstance(value, ast.Attribute) and value.attr in _PARTS:
                aliases[target.id] = value.attr
    return aliases


def _names_the_record(node: ast.expr) -> bool:
    # The record goes by `call` (or `self.call`, `gw.call`) wherever the gateway holds it.
    return (isinstance(node, ast.Name) and node.id == "call") or (
        isinstance(node, ast.Attribute) and node.attr == "call"
    )


def writes() -> list[tuple[str, str, str, int]]:
    """(module, part, field, line) of every write to the call record's fields in app/."""
    found: list[tuple[str, str, str, int]] = []
    for path in sorted(APP.rglob("*.py")):
        if path == APP / "call" / "record.py":
            continue  # the record's own methods
        tree = ast.parse(path.read_text(), str(path))
        aliases = _aliases(tree)
        for node in ast.walk(tree):
            for target in _targets(node):
                if not isinstance(target, ast.Attribute):
                    continue
                base = target.value
                part = None
                if isinstance(base, ast.Attribute) and base.attr in _PARTS:
                    part = base.attr
                elif isinstance(base, ast.Name) and base.id in aliases:
                    part = aliases[base.id]
                elif _names_the_record(base) and target.attr in _RECORD_ONLY:
                    part = "record"
                if part is not None and target.attr in OWNERS[part]:
                    found.append((module_name(path), part, target.attr, target.lineno))
    return found


def test_the_writes_are_found() -> None:
    found = {(module, part, name) for module, part, name, _ in writes()}
    assert ("app.proxy.upstream", "outcome", "attempts") in found
    assert ("app.access.attribution", "admitted", "feature") in found  # through `who = call.admitted`
    assert ("app.proxy.hot_routes", "record", "route") in found


def test_each_part_is_written_only_by_its_owners() -> None:
    strays = [
        f"{module}:{line} writes {part}.{name}"
        for module, part, name, line in writes()
        if not any(
            module == owner or (owner.endswith(".") and module.startswith(owner))
            for owner in OWNERS[part][name]
        )
    ]
    assert not strays, "\n".join(strays)
