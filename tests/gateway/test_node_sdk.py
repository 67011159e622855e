"""The official Node SDK (`npm install openai`, `node --test`) against the gateway and the fake upstream."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.harness import MASTER_KEY, ThreadedGateway

NODE_TESTS = Path(__file__).resolve().parents[1] / "node"


def test_node_sdk_patterns(gateway: ThreadedGateway) -> None:
    node = shutil.which("node")
    if node is None or not (NODE_TESTS / "node_modules" / "openai").is_dir():
        pytest.fail("Node.js and tests/node/node_modules are needed: `make test` installs them (npm ci)")
    result = subprocess.run(
        [node, "--test", "--test-reporter=spec", "gateway.test.mjs"],
        cwd=NODE_TESTS,
        env={**os.environ, "GATEWAY_BASE_URL": gateway.base_url, "GATEWAY_API_KEY": MASTER_KEY},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The spec reporter's summary: "pass N" and "fail 0".
    assert re.search(r"\bfail 0\b", result.stdout), result.stdout
    assert re.search(r"\bpass [1-9]", result.stdout), result.stdout
