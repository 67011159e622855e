"""The image the Dockerfile builds, run as an operator runs it, and the compose file that runs it.

The image test needs a Docker engine on Linux (the container shares the host's network to reach the
test Postgres and the fake upstream on 127.0.0.1) and is skipped without one. GATEWAY_TEST_IMAGE_BASE
names another base image than the Dockerfile's (deploy/debian-python-base.sh makes one where Docker Hub
is out of reach)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import sdk_client
from tests.db import create_database, drop_database, wait_for_rows
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent


def _engine_problem() -> str | None:
    """Why no image can be built here, in a few words; None when a Docker engine answers."""
    if shutil.which("docker") is None:
        return "no docker command"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "the Docker engine does not answer"
    if info.returncode != 0:
        return "no Docker engine answers"
    return None


ENGINE_PROBLEM = _engine_problem()
needs_engine = pytest.mark.skipif(
    ENGINE_PROBLEM is not None, reason=f"{ENGINE_PROBLEM}: the image is not built"
)


def _docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    tag = f"llm-gateway-test:{uuid.uuid4().hex[:10]}"
    base = os.environ.get("GATEWAY_TEST_IMAGE_BASE")
    build_args = ["--build-arg", f"PYTHON_IMAGE={base}"] if base else []
    # A cold build downloads the locked wheels; later ones reuse the engine's layer cache.
    built = _docker("build", "--quiet", "--tag", tag, *build_args, str(ROOT), timeout=900)
    assert built.returncode == 0, built.stderr[-4000:]
    yield tag
    _docker("image", "rm", tag)


@needs_engine
def test_the_image_migrates_serves_meters_and_stops(image: str, fake: FakeOpenAI) -> None:
    """Its entrypoint migrates an empty Postgres database; it answers /healthz, /readyz and its own
    HEALTHCHECK, serves the SDK's chat completion with the usage row written, runs as its non-root user
    with the gateway installed (not editable) and no pip, and exits 0 on `docker stop`."""
    db_name, db_url = create_database("gateway_image", migrated=False)
    container = f"llm-gateway-test-{uuid.uuid4().hex[:10]}"
    port = free_port()
    env = {
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "GATEWAY_WORKERS": "2",  # as docker-compose.yml runs it
        "DATABASE_URL": db_url,
        "OPENAI_BASE_URL": fake.base_url,
        "OPENAI_API_KEY": fake.api_key,
        "GATEWAY_MASTER_KEY": MASTER_KEY,
    }
    env_args = [arg for name, value in env.items() for arg in ("--env", f"{name}={value}")]
    try:
        started = _docker("run", "--detach", "--name", container, "--network", "host", *env_args, image)
        assert started.returncode == 0, started.stderr
        base = f"http://127.0.0.1:{port}"

        def ready() -> httpx.Response | None:
            try:
                response = httpx.get(f"{base}/readyz", timeout=2)
            except httpx.TransportError:
                return None
            return response if response.status_code == 200 else None

        try:
            readiness = wait_until(ready, timeout=90, interval=0.2)
        except AssertionError:
            pytest.fail(f"never ready; the container's log:\n{_docker('logs', container).stderr[-4000:]}")
        assert readiness.json() == {
            "status": "ready",
            "checks": {"database": "ok", "schema": "ok", "upstream": "ok"},
        }
        assert httpx.get(f"{base}/healthz", timeout=5).json() == {"status": "ok"}

        # The image's own HEALTHCHECK command, run in it now rather than waited for.
        config = json.loads(_docker("inspect", "--format", "{{json .Config}}", container).stdout)
        kind, *health_command = config["Healthcheck"]["Test"]
        assert kind == "CMD"
        health = _docker("exec", container, *health_command)
        assert health.returncode == 0, health.stderr

        with sdk_client(f"{base}/v1") as client:
            reply = client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "Hello"}],
                extra_headers={
                    "X-Feature": "image-check",
                    "X-User-Id": "operator",
                    "X-Request-Id": container,
                },
            )
        assert reply.choices[0].message.content
        assert reply.usage is not None
        assert fake.requests[-1].headers["authorization"] == f"Bearer {fake.api_key}"
        [row] = wait_for_rows(db_url, container, timeout=20)
        assert (row["feature"], row["user_id"], row["status_code"]) == ("image-check", "operator", 200)
        assert (row["prompt_tokens"], row["completion_tokens"]) == (
            reply.usage.prompt_tokens,
            reply.usage.completion_tokens,
        )

        assert _docker("exec", container, "id", "-u").stdout.strip() == "10001"
        installed = _docker("exec", container, "python", "-c", "import app; print(app.__file__)")
        assert installed.stdout.startswith("/opt/venv/lib/"), installed
        assert _docker("exec", container, "python", "-c", "import pip").returncode != 0

        stopped = _docker("stop", "--time", "30", container, timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        assert _docker("inspect", "--format", "{{.State.ExitCode}}", container).stdout.strip() == "0"
    finally:
        _docker("rm", "--force", container)
        drop_database(db_name)


def test_a_plain_compose_up_needs_no_variable_of_an_optional_profile() -> None:
    """Compose fills in every service's variables before it drops the services outside the chosen
    profiles: a variable required (`${VAR:?…}`) only by a dashboards service would stop `docker compose
    up` for everyone who never asked for the dashboards."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]

    def required(*names: str) -> set[str]:
        return set(re.findall(r"\$\{(\w+):?\?", json.dumps([services[name] for name in names])))

    always = [name for name, service in services.items() if "profiles" not in service]
    optional = [name for name, service in services.items() if "profiles" in service]
    assert optional and "POSTGRES_PASSWORD" in required(*always)
    assert required(*optional) <= required(*always)
