"""What `llm-gateway serve` hands to uvicorn from the gateway's settings."""

from __future__ import annotations

import argparse
import logging
from typing import Any

import pytest
import uvicorn

from app import cli


def test_serve_hands_the_worker_health_ping_timeout_to_uvicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    seen: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda *_, **kwargs: seen.update(kwargs))
    monkeypatch.setenv("GATEWAY_MASTER_KEY", "sk-serve-settings-master")
    try:
        monkeypatch.delenv("GATEWAY_WORKER_HEALTHCHECK_TIMEOUT_S", raising=False)
        assert cli._serve(argparse.Namespace(workers=None, host=None, port=None)) == 0
        assert seen["timeout_worker_healthcheck"] == 30
        monkeypatch.setenv("GATEWAY_WORKER_HEALTHCHECK_TIMEOUT_S", "45")
        assert cli._serve(argparse.Namespace(workers=None, host=None, port=None)) == 0
        assert seen["timeout_worker_healthcheck"] == 45
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
