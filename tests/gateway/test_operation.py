"""Health probes, start-up with a bad configuration, and graceful SIGTERM of a real process."""

from __future__ import annotations

import logging
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
import trustme

from app.logs import configure_logging
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, GatewayProcess, ThreadedGateway, free_port, refused_start, wait_until


def test_healthz(gateway: ThreadedGateway) -> None:
    response = httpx.get(gateway.url + "/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_when_ready(gateway: ThreadedGateway) -> None:
    response = httpx.get(gateway.url + "/readyz")
    assert response.status_code == 200
    assert response.json()["checks"] == {"database": "ok", "schema": "ok", "upstream": "ok"}


def test_readyz_reports_an_unreachable_database(start_gateway: Callable[..., ThreadedGateway]) -> None:
    gateway = start_gateway(database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/nothing")
    response = httpx.get(gateway.url + "/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["database"].startswith("unreachable")


def test_readyz_reports_a_missing_openai_key(start_gateway: Callable[..., ThreadedGateway]) -> None:
    gateway = start_gateway(openai_api_key=None, openai_base_url="https://api.openai.com/v1")
    response = httpx.get(gateway.url + "/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["upstream"] == "OPENAI_API_KEY is not set"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"GATEWAY_MASTER_KEY": ""}, "GATEWAY_MASTER_KEY"),
        ({"GATEWAY_MAX_ATTEMPTS": "many"}, "GATEWAY_MAX_ATTEMPTS"),
        ({"OPENAI_BASE_URL": "api.openai.com"}, "OPENAI_BASE_URL"),
    ],
)
def test_bad_configuration_stops_startup_with_one_line(env: dict[str, str], expected: str) -> None:
    assert refused_start(env).startswith("llm-gateway: invalid configuration: " + expected)


def test_sigterm_lets_an_open_stream_finish(
    fake_server: FakeOpenAI, database_url: str, tmp_path: Path
) -> None:
    fake_server.reset()
    slow = FakeOpenAI(inter_token_delay_s=0.2).start()
    gateway = GatewayProcess(slow, database_url, tmp_path, env={"GATEWAY_SHUTDOWN_TIMEOUT_S": "20"}).start()
    try:
        with openai.OpenAI(base_url=gateway.url + "/v1", api_key=MASTER_KEY, max_retries=0) as sdk:
            slow.reply("one two three four five six")
            stream = sdk.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "x"}], stream=True
            )
            chunks = iter(stream)
            first = next(chunks)
            assert gateway.proc is not None
            gateway.proc.send_signal(signal.SIGTERM)
            rest = list(chunks)
        text = (first.choices[0].delta.content or "") + "".join(
            c.choices[0].delta.content or "" for c in rest
        )
        assert text == "one two three four five six"
        assert rest[-1].choices[0].finish_reason == "stop"
        # uvicorn re-raises the signal once it has shut down cleanly, so the exit status is -SIGTERM.
        assert gateway.proc.wait(timeout=20) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):
            httpx.get(gateway.url + "/healthz")
    finally:
        gateway.stop()
        slow.stop()


def test_make_demo_runs_end_to_end() -> None:
    result = subprocess.run([sys.executable, "-m", "tests.demo"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "chat:    Hello! I answered through the gateway." in result.stdout
    assert "stream: |Streams| arrive|" in result.stdout
    # Then what the gateway made of the two calls: their rows, attributed and priced, and the report.
    recorded = result.stdout.split("What the gateway recorded")[1].split("The usage report")[0]
    rows = [line.split() for line in recorded.splitlines() if line.startswith("/v1/chat/completions")]
    assert [row[1:5] for row in rows] == [
        ["False", "demo", "newcomer", "gpt-4o-mini"],
        ["True", "demo", "newcomer", "gpt-4o-mini"],
    ]
    assert all(int(row[5]) > 0 and int(row[6]) > 0 and row[7].startswith("0.0000") for row in rows)
    report = result.stdout.split("The usage report")[1].split("Where to look next")[0]
    assert [line for line in report.splitlines() if line.strip()][-1].split()[:3] == ["demo", "newcomer", "2"]
    assert "llm-gateway keys create" in result.stdout.split("Where to look next")[1]
    assert '"level":"warning"' not in result.stderr and '"level":"error"' not in result.stderr


def test_a_served_process_writes_one_access_line_a_request_and_uvicorn_none(
    fake_server: FakeOpenAI, database_url: str, tmp_path: Path
) -> None:
    fake_server.reset()
    gateway = GatewayProcess(fake_server, database_url, tmp_path).start()
    try:
        request_id = "one-access-line"
        httpx.post(
            gateway.url + "/v1/chat/completions",
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
            headers={"authorization": f"Bearer {MASTER_KEY}", "x-request-id": request_id},
        ).raise_for_status()

        def access_lines() -> list[str]:
            return [line for line in gateway.log_path.read_text().splitlines() if request_id in line]

        # Ours is written once the response has ended, so wait for it; uvicorn's would be written first.
        wait_until(lambda: any('"msg":"request"' in line for line in access_lines()), timeout=10)
        assert len(access_lines()) == 1
        assert "HTTP/1.1" not in gateway.log_path.read_text()
    finally:
        gateway.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_BATCH is Linux's")
def test_the_upstream_io_thread_does_not_preempt_the_event_loop(
    fake_server: FakeOpenAI, database_url: str, tmp_path: Path
) -> None:
    """pyreqwest's I/O thread runs as SCHED_BATCH (no preemption of the loop's thread on wakeup); the
    event loop's thread keeps the normal policy."""
    fake_server.reset()
    gateway = GatewayProcess(fake_server, database_url, tmp_path).start()
    try:
        assert gateway.proc is not None
        pid = gateway.proc.pid
        policies: dict[str, set[int]] = {}
        for tid in os.listdir(f"/proc/{pid}/task"):
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            policies.setdefault(name, set()).add(os.sched_getscheduler(int(tid)))
        assert policies.get("pyreqwest") == {os.SCHED_BATCH}, policies
        assert os.sched_getscheduler(pid) == os.SCHED_OTHER
    finally:
        gateway.stop()


def test_uvicorn_sees_no_handler_for_its_access_log() -> None:
    """uvicorn checks hasHandlers() once a connection; with a handler in reach it formats its access
    line's arguments for every response, even for a disabled logger."""
    configure_logging("info")
    assert not logging.getLogger("uvicorn.access").hasHandlers()


def test_an_upstream_over_tls_is_trusted_through_ssl_cert_file(database_url: str, tmp_path: Path) -> None:
    # OpenAI is reached over TLS; a private CA (a self-hosted upstream, a company's TLS proxy) is trusted
    # the usual way, through SSL_CERT_FILE, and an unknown one is refused.
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with FakeOpenAI(ssl_context=server_context) as upstream:
        assert upstream.base_url.startswith("https://")
        (tmp_path / "trusted").mkdir()
        (tmp_path / "untrusted").mkdir()
        trusted = GatewayProcess(
            upstream, database_url, tmp_path / "trusted", env={"SSL_CERT_FILE": str(ca_file)}
        )
        untrusted = GatewayProcess(
            upstream, database_url, tmp_path / "untrusted", env={"GATEWAY_MAX_ATTEMPTS": "1"}
        )
        untrusted.env.pop("SSL_CERT_FILE", None)
        trusted.start()
        untrusted.start()
        try:
            with openai.OpenAI(base_url=trusted.url + "/v1", api_key=MASTER_KEY, max_retries=0) as sdk:
                answer = sdk.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
                )
                assert answer.choices[0].message.content
                stream = sdk.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
                )
                assert "".join(chunk.choices[0].delta.content or "" for chunk in stream)
            with (
                openai.OpenAI(base_url=untrusted.url + "/v1", api_key=MASTER_KEY, max_retries=0) as sdk,
                pytest.raises(openai.InternalServerError) as caught,
            ):
                sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
            assert caught.value.status_code == 502
            assert caught.value.code == "upstream_connect"
        finally:
            trusted.stop()
            untrusted.stop()


def test_gzip_compressed_answers_are_relayed_decompressed_and_streams_event_by_event(
    database_url: str, tmp_path: Path
) -> None:
    # OpenAI compresses its answers for a client that accepts it; the gateway's client does, and relays
    # them decompressed, a compressed stream still event by event.
    with FakeOpenAI(gzip=True) as upstream:
        gateway = GatewayProcess(upstream, database_url, tmp_path).start()
        try:
            with openai.OpenAI(base_url=gateway.url + "/v1", api_key=MASTER_KEY, max_retries=0) as sdk:
                upstream.reply("a compressed answer")
                answer = sdk.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
                )
                assert answer.choices[0].message.content == "a compressed answer"
                assert answer.usage is not None and answer.usage.total_tokens > 0
                upstream.hang_stream(chunks_before_hang=3)
                stream = sdk.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
                )
                first, second = next(iter(stream)), next(iter(stream))
                assert first.choices[0].delta.role == "assistant"
                assert second.choices[0].delta.content
                stream.close()
            sent = upstream.requests
            assert len(sent) == 2 and all(record.compressed for record in sent)
        finally:
            gateway.stop()
