"""What a new user meets in the first hour, through real processes where it is about processes: the
README's commands as printed, a database nobody migrated, `migrate` and a bad DATABASE_URL, several
workers without Redis, an upstream out of reach, money in one format, the test run without Postgres,
`make run`'s banner, and the CLI agreeing with the admin and usage APIs."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import orjson
import pytest
import yaml

from app.db.migrate import BEHIND, SchemaCheck
from app.money import usd
from tests.db import create_database, database_url_for, drop_database, fetch, wait_for_rows
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, GatewayProcess, ThreadedGateway, free_port, refused_start, wait_until
from tests.limits import REDIS_URL

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
AUTH = {"authorization": f"Bearer {MASTER_KEY}"}
# A number written with an exponent, as Decimal and float formatting would: 0E-10, 2E+1, 9e-06.
EXPONENT = re.compile(r"\d[eE][+-]?\d")


def clean_env(**extra: str) -> dict[str, str]:
    """The test run's environment without the gateway's own settings, plus these."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GATEWAY_", "OPENAI_", "MAKE", "MFLAGS")) and k != "DATABASE_URL"
    }
    return {**base, **extra}


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def unmigrated_database() -> tuple[str, str]:
    return create_database("gateway_unmigrated", migrated=False)


# --- The README's commands, as printed ---------------------------------------------------------------


def readme_curl_commands() -> list[str]:
    """Every `curl` command in the README's shell blocks, its continuation lines joined."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        # A quoted JSON body may span lines without a backslash: shlex reads the command whole.
        for command in re.split(r"\n(?=\S)", joined):
            if command.lstrip().startswith("curl "):
                commands.append(command.strip())
    return commands


def test_the_readme_curl_commands_work_as_printed(gateway: ThreadedGateway) -> None:
    commands = readme_curl_commands()
    assert commands, "the README has a curl example"
    for command in commands:
        shlex.split(command)  # well-formed shell
        result = subprocess.run(
            ["bash", "-c", command.replace("http://127.0.0.1:8080", gateway.url)],
            env={**os.environ, "GATEWAY_MASTER_KEY": MASTER_KEY},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        answer = orjson.loads(result.stdout)
        assert "error" not in answer, (command, answer)
        if "/admin/keys" in command and "-X POST" in command:
            assert answer["secret"].startswith("sk-gw-")
            assert answer["budget_daily_usd"] == "20.00"


@pytest.mark.parametrize(
    ("content_type", "body", "says"),
    [
        (None, b'{"name": "x"}', "no Content-Type was sent"),
        (
            "application/x-www-form-urlencoded",
            b'{"name": "x"}',
            "got Content-Type: application/x-www-form-urlencoded",
        ),
        ("text/plain", b"name=x", "got Content-Type: text/plain"),
        ("application/json", b'{"name": ', "not valid JSON"),
        ("application/json", b'["name"]', "must be a JSON object"),
    ],
)
def test_a_body_that_is_not_a_json_object_says_what_to_send(
    gateway: ThreadedGateway, content_type: str | None, body: bytes, says: str
) -> None:
    before = len(httpx.get(gateway.url + "/admin/keys", headers=AUTH).json()["data"])
    headers = {**AUTH, **({"content-type": content_type} if content_type else {})}
    # httpx adds no Content-Type to raw content: the request goes as the headers say.
    response = httpx.post(gateway.url + "/admin/keys", content=body, headers=headers)
    assert response.status_code == 400
    error = response.json()["error"]
    assert says in error["message"]
    if content_type is None or "json" not in content_type:
        assert "Content-Type: application/json" in error["message"]
    assert error["type"] == "invalid_request_error"
    assert len(httpx.get(gateway.url + "/admin/keys", headers=AUTH).json()["data"]) == before


# --- A database nobody migrated, and `migrate` -----------------------------------------------------------


def test_serve_on_a_database_never_migrated_is_not_ready_and_says_so_once(
    fake_server: FakeOpenAI, tmp_path: Path
) -> None:
    name, url = unmigrated_database()
    fake_server.reset()
    gateway = GatewayProcess(fake_server, url, tmp_path).start()
    try:
        ready = httpx.get(gateway.url + "/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["schema"] == BEHIND == "schema is behind: run `llm-gateway migrate`"
        # What needs the tables answers 503 saying so, without a traceback in the log for each call.
        listed = httpx.get(gateway.url + "/admin/keys", headers=AUTH)
        assert listed.status_code == 503
        assert listed.json()["error"]["message"] == f"The gateway's database {BEHIND}."
        # Calls are served (the request path never waits on the database); their usage is spooled.
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key=MASTER_KEY, max_retries=0) as sdk:
            for _ in range(3):
                fake_server.reply("ok")
                sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
        # The first write and then the spool's replays fail, each of which used to log its own error.
        wait_until(lambda: write_errors(gateway.url) >= 3, timeout=15, interval=0.1)
        log = gateway.log_path.read_text()
        assert log.count(BEHIND) == 1, log
        assert "ProgrammingError" not in log and "UndefinedTable" not in log and "42P01" not in log
        assert "Traceback" not in log

        migrated = cli("migrate", env=clean_env(DATABASE_URL=url))
        assert migrated.returncode == 0, migrated.stderr
        assert f"applied {len(SchemaCheck().known)} migration(s)" in migrated.stdout
        assert "0001: usage_events and the usage_daily rollup" in migrated.stdout
        wait_until(lambda: httpx.get(gateway.url + "/readyz").status_code == 200, timeout=10)
        assert httpx.get(gateway.url + "/readyz").json()["checks"]["schema"] == "ok"
        # The spool's next replay (its backoff is a few seconds by now) writes the calls' usage.
        wait_until(lambda: fetch(url, "SELECT count(*) AS n FROM usage_events")[0]["n"] == 3, timeout=40)
    finally:
        gateway.stop()
        drop_database(name)


def write_errors(url: str) -> float:
    metrics = httpx.get(url + "/metrics").text
    found = re.search(r"^gateway_recorder_db_write_errors_total (\S+)$", metrics, flags=re.M)
    return float(found[1]) if found else 0.0


def test_migrate_says_what_it_applied_or_that_nothing_was_needed() -> None:
    name, url = unmigrated_database()
    try:
        first = cli("migrate", env=clean_env(DATABASE_URL=url))
        assert first.returncode == 0, first.stderr
        applied = [line.split(":")[0].strip() for line in first.stdout.splitlines()[1:]]
        # Oldest first; later releases' migrations follow 0005.
        assert applied[:5] == ["0001", "0002", "0003", "0004", "0005"]
        assert set(applied) == SchemaCheck().known
        second = cli("migrate", env=clean_env(DATABASE_URL=url))
        assert second.returncode == 0, second.stderr
        assert second.stdout.strip().endswith("is at the latest schema already; nothing to apply")
    finally:
        drop_database(name)


CLOSED = f"postgresql://gw:hunter2@127.0.0.1:{free_port()}/gw"


@pytest.mark.parametrize(
    ("command", "database_url", "status", "says"),
    [
        (("migrate",), CLOSED, 1, "llm-gateway migrate: database postgresql://gw:***@127.0.0.1:"),
        (
            ("migrate",),
            database_url_for("no_such_database_here"),
            1,
            'database "no_such_database_here" does not exist',
        ),
        (
            ("migrate",),
            "mysql://gw:hunter2@127.0.0.1/gw",
            2,
            "DATABASE_URL: Value error, unsupported database 'mysql'",
        ),
        (("migrate",), "not a url at all hunter2", 2, "DATABASE_URL: Value error, not a database URL"),
        (("usage",), CLOSED, 1, "llm-gateway usage: database postgresql://gw:***@127.0.0.1:"),
        (("keys", "list"), CLOSED, 1, "llm-gateway keys: database postgresql://gw:***@127.0.0.1:"),
    ],
)
def test_a_bad_database_url_is_one_line_not_a_traceback(
    command: tuple[str, ...], database_url: str, status: int, says: str
) -> None:
    result = cli(*command, env=clean_env(DATABASE_URL=database_url))
    assert result.returncode == status
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr and "hunter2" not in result.stderr
    assert says in result.stderr


@pytest.mark.parametrize(
    ("database_url", "says"),
    [
        ("mysql://gw:hunter2@127.0.0.1/gw", "unsupported database 'mysql'"),
        ("not a url at all hunter2", "not a database URL"),
    ],
)
def test_serve_refuses_a_database_url_it_cannot_use_in_one_line(database_url: str, says: str) -> None:
    line = refused_start({"DATABASE_URL": database_url})
    assert line.startswith("llm-gateway: invalid configuration: DATABASE_URL:") and says in line
    assert "hunter2" not in line


def test_the_cli_on_a_database_never_migrated_says_to_migrate() -> None:
    name, url = unmigrated_database()
    try:
        result = cli("usage", env=clean_env(DATABASE_URL=url))
        assert result.returncode == 1
        assert result.stderr.strip().endswith(BEHIND)
    finally:
        drop_database(name)


# --- Several workers without Redis ------------------------------------------------------------------------


@pytest.mark.parametrize("with_redis", [False, True])
def test_several_workers_without_redis_warn_once_when_limits_are_set(
    fake_server: FakeOpenAI, database_url: str, tmp_path: Path, with_redis: bool
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("features:\n  search: {rpm: 2, budget_daily_usd: 5}\n")
    env = {"GATEWAY_CONFIG": str(config), **({"GATEWAY_REDIS_URL": REDIS_URL} if with_redis else {})}
    gateway = GatewayProcess(fake_server, database_url, tmp_path, env=env, args=("--workers", "2")).start()
    gateway.stop()
    warnings = [line for line in gateway.log_path.read_text().splitlines() if "GATEWAY_REDIS_URL" in line]
    if with_redis:
        assert warnings == []
    else:
        assert len(warnings) == 1, warnings
        assert '"level":"warning"' in warnings[0]
        assert "2 workers" in warnings[0] and "feature 'search'" in warnings[0]


def test_without_limits_no_warning_and_a_key_with_a_limit_warns(
    fake_server: FakeOpenAI, scratch_db: tuple[str, str], tmp_path: Path
) -> None:
    # A database of its own: no key with a limit in it, and no configuration file.
    gateway = GatewayProcess(fake_server, scratch_db[1], tmp_path, args=("--workers", "2")).start()
    gateway.stop()
    assert "GATEWAY_REDIS_URL" not in gateway.log_path.read_text()

    env = clean_env(DATABASE_URL=scratch_db[1])
    assert cli("keys", "create", "capped", "--budget-monthly-usd", "100", env=env).returncode == 0
    gateway.log_path.unlink()
    gateway = GatewayProcess(fake_server, scratch_db[1], tmp_path, args=("--workers", "2")).start()
    gateway.stop()
    warnings = [line for line in gateway.log_path.read_text().splitlines() if "GATEWAY_REDIS_URL" in line]
    assert len(warnings) == 1 and "1 gateway key(s)" in warnings[0]


def test_the_compose_file_shares_the_counters_of_its_workers_through_redis() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    gateway = services["gateway"]
    workers = re.search(r"\d+", str(gateway["environment"]["GATEWAY_WORKERS"]))
    assert workers and int(workers[0]) > 1
    redis_url = gateway["environment"]["GATEWAY_REDIS_URL"]
    host = httpx.URL(redis_url).host
    assert redis_url.startswith("redis://") and host in services
    assert "redis" in services[host]["image"]
    assert host in gateway["depends_on"]


# --- An upstream out of reach ---------------------------------------------------------------------------


@pytest.mark.parametrize("with_key", [False, True])
def test_an_unreachable_upstream_names_the_host_and_the_settings_to_check(
    start_gateway: Callable[..., ThreadedGateway], with_key: bool
) -> None:
    port = free_port()
    gateway = start_gateway(
        openai_base_url=f"http://127.0.0.1:{port}/v1",
        openai_api_key="sk-x" if with_key else None,
        max_attempts=2,
    )
    sdk = openai.OpenAI(base_url=gateway.base_url, api_key=MASTER_KEY, max_retries=0)
    with sdk, pytest.raises(openai.APIStatusError) as raised:
        sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert raised.value.status_code == 502
    message = str(raised.value)
    assert f"127.0.0.1:{port}" in message and "after 2 attempt(s)" in message
    assert "Check OPENAI_BASE_URL" in message
    assert ("OPENAI_API_KEY is not set" in message) is not with_key


def test_an_upstream_refusing_the_gateways_key_names_the_host_and_the_setting(
    start_gateway: Callable[..., ThreadedGateway], fake: FakeOpenAI
) -> None:
    gateway = start_gateway(openai_api_key=None)
    fake.fail(401)
    sdk = openai.OpenAI(base_url=gateway.base_url, api_key=MASTER_KEY, max_retries=0)
    with sdk, pytest.raises(openai.APIStatusError) as raised:
        sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert raised.value.status_code == 502
    host = httpx.URL(fake.base_url)
    assert f"The upstream at {host.host}:{host.port} rejected" in str(raised.value)
    assert "check OPENAI_API_KEY (it is not set)" in str(raised.value)


# --- Money ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "written"),
    [
        ("0E-10", "0.00"),
        ("2E+1", "20.00"),
        ("20.0000000000", "20.00"),
        ("9e-6", "0.000009"),
        ("0.0000000001", "0.0000000001"),
        ("1234567.5", "1234567.50"),
        ("0.0028", "0.0028"),
    ],
)
def test_money_is_written_one_way(amount: str, written: str) -> None:
    assert usd(Decimal(amount)) == written


# (feature, cost_usd) of the rows the reports below read.
COSTS = [("zero", "0"), ("tiny", "0.000009"), ("round", "20"), ("tenth", "0.0000000001")]


@pytest.fixture(scope="module")
def priced(make_settings: Callable[..., object]) -> Iterator[tuple[str, ThreadedGateway]]:
    """A database whose usage_daily holds one row a feature with the costs above, and a gateway on it."""
    name, url = create_database("gateway_money")
    today = datetime.now(UTC).date().isoformat()
    values = ", ".join(
        f"('{today}', '{feature}', 'u', 'gpt-4o', 1, 1, 1, 2, {cost})" for feature, cost in COSTS
    )
    fetch(
        url,
        "INSERT INTO usage_daily (day, feature, user_id, model, requests, prompt_tokens, completion_tokens,"
        f" total_tokens, cost_usd) VALUES {values}",
    )
    gateway = ThreadedGateway(make_settings(database_url=url)).start()  # type: ignore[arg-type]
    try:
        yield url, gateway
    finally:
        gateway.stop()
        drop_database(name)


EXPECTED = {"zero": "0.00", "tiny": "0.000009", "round": "20.00", "tenth": "0.0000000001"}


def test_money_is_one_format_in_json_csv_and_the_cli(priced: tuple[str, ThreadedGateway]) -> None:
    url, gateway = priced
    outputs = []
    answer = httpx.get(gateway.url + "/v1/usage", params={"group_by": "feature"}, headers=AUTH)
    outputs.append(answer.text)
    assert {row["feature"]: row["cost_usd"] for row in answer.json()["data"]} == EXPECTED
    csv_answer = httpx.get(
        gateway.url + "/v1/usage", params={"group_by": "feature", "format": "csv"}, headers=AUTH
    )
    outputs.append(csv_answer.text)
    env = clean_env(DATABASE_URL=url)
    cli_json = cli("usage", "--by", "feature", "--format", "json", env=env)
    outputs.append(cli_json.stdout)
    assert {row["feature"]: row["cost_usd"] for row in orjson.loads(cli_json.stdout)} == EXPECTED
    for fmt in ("csv", "table"):
        outputs.append(cli("usage", "--by", "feature", "--format", fmt, env=env).stdout)
    for output in outputs:
        assert not EXPONENT.search(output), output
        for cost in EXPECTED.values():
            assert cost in output
        assert "20.0000000000" not in output


def test_money_is_one_format_in_the_admin_api(gateway: ThreadedGateway) -> None:
    created = httpx.post(
        gateway.url + "/admin/keys",
        json={"name": "money", "budget_daily_usd": "2E+1", "budget_monthly_usd": "0.00010"},
        headers=AUTH,
    ).json()
    assert (created["budget_daily_usd"], created["budget_monthly_usd"]) == ("20.00", "0.0001")
    budgets = httpx.get(gateway.url + "/admin/budgets", headers=AUTH).json()["data"]
    mine = {row["period"]: row for row in budgets if row["scope"] == f"key:{created['id']}"}
    assert (mine["day"]["cap_usd"], mine["day"]["spent_usd"], mine["day"]["remaining_usd"]) == (
        "20.00",
        "0.00",
        "20.00",
    )
    assert mine["month"]["cap_usd"] == "0.0001"


# --- The test run without Postgres, and make run's banner -------------------------------------------------


def test_the_test_run_says_up_front_when_postgres_is_missing() -> None:
    closed = f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/test"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gateway/test_operation.py"],
        env={**os.environ, "TEST_DATABASE_URL": closed},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    assert len(output.strip().splitlines()) <= 3, output
    assert f"The tests need Postgres at postgresql://postgres:***@127.0.0.1:{closed.split(':')[3]}" in output
    assert "docker run" in output and "hunter2" not in output and " ERROR " not in output


def test_make_run_masks_the_database_password() -> None:
    result = subprocess.run(
        ["make", "-s", "run"],
        env=clean_env(
            DATABASE_URL=f"postgresql://gw:hunter2@127.0.0.1:{free_port()}/gw", GATEWAY_PORT=str(free_port())
        ),
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    # migrate cannot reach the database, so the gateway never starts.
    assert result.returncode != 0
    assert "hunter2" not in result.stdout + result.stderr
    assert "(database: postgresql://gw:***@127.0.0.1:" in result.stdout
    assert "llm-gateway migrate: database postgresql://gw:***@127.0.0.1:" in result.stderr


# --- The CLI and the API agree ------------------------------------------------------------------------------


def test_usage_has_the_same_defaults_in_the_cli_and_the_api(priced: tuple[str, ThreadedGateway]) -> None:
    url, gateway = priced
    api = httpx.get(gateway.url + "/v1/usage", headers=AUTH).json()
    assert api["group_by"] == ["day"]
    assert api["start"] == datetime.now(UTC).date().replace(day=1).isoformat()
    from_cli = cli("usage", "--format", "json", env=clean_env(DATABASE_URL=url))
    assert from_cli.returncode == 0, from_cli.stderr
    assert orjson.loads(from_cli.stdout) == api["data"]
    table = cli("usage", env=clean_env(DATABASE_URL=url)).stdout.splitlines()
    assert table[0].split()[0] == "day"


def test_keys_can_be_created_with_an_expiry_listed_in_full_and_updated_from_the_cli(
    gateway: ThreadedGateway, database_url: str, fake: FakeOpenAI
) -> None:
    env = clean_env(DATABASE_URL=database_url)
    name = f"cli-{uuid.uuid4().hex[:8]}"
    created = cli(
        "keys",
        "create",
        name,
        "--rpm-limit",
        "50",
        "--budget-daily-usd",
        "20",
        "--expires-at",
        "2031-06-30",
        env=env,
    )
    assert created.returncode == 0, created.stderr
    key_id = created.stdout.split()[1]
    secret = next(line.split()[1] for line in created.stdout.splitlines() if line.startswith("secret:"))

    def listed() -> dict[str, str]:
        lines = cli("keys", "list", env=env).stdout.splitlines()
        header = lines[0].split()
        row = next(line for line in lines if line.startswith(key_id)).split()
        return dict(zip(header, row, strict=True))

    row = listed()
    assert (row["rpm"], row["budget_day_usd"], row["expires_at"], row["last_used_at"], row["state"]) == (
        "50",
        "20.00",
        "2031-06-30T00:00Z",
        "-",
        "active",
    )
    request_id = f"last-use-{uuid.uuid4().hex}"
    fake.reply("ok")
    with openai.OpenAI(base_url=gateway.base_url, api_key=secret, max_retries=0) as sdk:
        sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"X-Request-Id": request_id},
        )
    used_at = wait_for_rows(database_url, request_id)[0]["created_at"]
    assert listed()["last_used_at"] == used_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%MZ")
    api = httpx.get(f"{gateway.url}/admin/keys/{key_id}", headers=AUTH).json()
    assert datetime.fromisoformat(api["last_used_at"]) == used_at
    assert any(
        k["id"] == key_id and k["last_used_at"]
        for k in httpx.get(gateway.url + "/admin/keys", headers=AUTH).json()["data"]
    )

    updated = cli(
        "keys", "update", key_id, "--rpm-limit", "none", "--tpm-limit", "900", "--name", name + "-2", env=env
    )
    assert updated.returncode == 0, updated.stderr
    api = httpx.get(f"{gateway.url}/admin/keys/{key_id}", headers=AUTH).json()
    assert (api["name"], api["rpm_limit"], api["tpm_limit"], api["budget_daily_usd"]) == (
        name + "-2",
        None,
        900,
        "20.00",
    )
    assert api["expires_at"].startswith("2031-06-30T00:00:00")

    # An expiry in the past: the key is refused at once (the change reaches the gateway's cache by NOTIFY).
    assert cli("keys", "update", key_id, "--expires-at", "2020-01-01T00:00:00Z", env=env).returncode == 0
    headers = {"authorization": f"Bearer {secret}"}
    wait_until(lambda: httpx.get(gateway.base_url + "/models", headers=headers).status_code == 401, timeout=5)
    assert listed()["state"] == "expired"
    assert cli("keys", "update", key_id, "--expires-at", "none", env=env).returncode == 0
    wait_until(lambda: httpx.get(gateway.base_url + "/models", headers=headers).status_code == 200, timeout=5)

    refused = cli("keys", "update", key_id, "--rpm-limit", "0", env=env)
    assert refused.returncode == 2 and "rpm_limit" in refused.stderr
    assert cli("keys", "update", "key_nonexistent", "--rpm-limit", "5", env=env).returncode == 1
    assert cli("keys", "update", key_id, "--scopes", "chat", "--name", "", env=env).returncode == 2
    assert httpx.get(f"{gateway.url}/admin/keys/{key_id}", headers=AUTH).json()["rpm_limit"] is None
