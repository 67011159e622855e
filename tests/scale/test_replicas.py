"""Three `llm-gateway serve` replicas behind nginx, sharing one Postgres database and one Redis, as
docker-compose.scale.yml runs them: the gateway holds no state of its own that a replica would need.

One set of replicas for the module; the drain test stops one of them, so it comes last."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import sdk_client
from tests.db import create_database, drop_database, usage_rows, wait_for_rows
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import MASTER_KEY, GatewayProcess, wait_until
from tests.limits import REDIS_URL, delete_keys, unique_prefix
from tests.scale import Nginx, accepts

MASTER = {"authorization": f"Bearer {MASTER_KEY}"}
MESSAGES: Any = [{"role": "user", "content": "Say a few words."}]
PIECES = 20
WORDS = " word" * PIECES  # the fake's unscripted answer, JSON or streamed
EXPENSIVE = {"prompt_tokens": 10_000, "completion_tokens": 10_000}  # $0.125 on gpt-4o
CALL_COST = Decimal("0.125")
CONFIG = """
features:
  scale-budget: {budget_daily_usd: 0.25}
  scale-burst: {budget_daily_usd: 0.25}
"""
BURST = 6
# Each call of the burst caps its output at 10,000 tokens: it reserves $0.10 and more (the prompt's
# estimate) of the $0.25 cap, so two reservations fit and a third does not, whichever replica holds them.
BURST_MAX_TOKENS = 10_000


@dataclass
class Cluster:
    fake: FakeOpenAI
    replicas: list[GatewayProcess]
    nginx: Nginx
    database_url: str
    addresses: list[str] = field(default_factory=list)

    def sdk(self, **kwargs: Any) -> openai.OpenAI:
        return sdk_client(self.nginx.base_url, **kwargs)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    name, url = create_database("gateway_scale")
    prefix = unique_prefix("scale")
    root = tmp_path_factory.mktemp("scale")
    config = root / "gateway.yaml"
    config.write_text(CONFIG)
    env = {
        "GATEWAY_REDIS_URL": REDIS_URL,
        "GATEWAY_REDIS_KEY_PREFIX": prefix,
        "GATEWAY_CONFIG": str(config),
        "GATEWAY_LOG_LEVEL": "warning",
    }
    replicas: list[GatewayProcess] = []
    try:
        with FakeOpenAI(reply_pieces=PIECES) as fake:
            for i in range(3):
                data_dir = root / f"replica-{i}"
                data_dir.mkdir()
                replicas.append(GatewayProcess(fake, url, data_dir, env=env).start(wait=False))
            for replica in replicas:
                wait_until(replica.ready, timeout=60)
            (root / "nginx").mkdir()
            nginx = Nginx(root / "nginx", [replica.port for replica in replicas]).start()
            try:
                addresses = [f"127.0.0.1:{replica.port}" for replica in replicas]
                yield Cluster(fake, replicas, nginx, url, addresses)
            finally:
                nginx.stop()
    finally:
        for replica in replicas:
            replica.stop()
        asyncio.run(delete_keys(prefix))
        drop_database(name)


def chat(
    sdk: openai.OpenAI,
    request_id: str,
    *,
    stream: bool,
    feature: str | None = None,
    max_tokens: int | openai.NotGiven = openai.NOT_GIVEN,
) -> str:
    """One chat completion through the SDK, its text; a stream must end with its usage chunk."""
    headers = {"X-Request-Id": request_id, **({"X-Feature": feature} if feature else {})}
    if not stream:
        reply = sdk.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, max_tokens=max_tokens, extra_headers=headers
        )
        return reply.choices[0].message.content or ""
    chunks = sdk.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=headers,
    )
    text, usage = "", None
    for chunk in chunks:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    assert usage is not None, "the stream ended without its usage chunk"
    return text


def new_ids(kind: str, n: int) -> list[str]:
    run = uuid.uuid4().hex[:8]
    return [f"scale-{kind}-{run}-{i}" for i in range(n)]


def make_key(cluster: Cluster, **spec: Any) -> dict[str, Any]:
    response = httpx.post(
        cluster.nginx.base_url.removesuffix("/v1") + "/admin/keys",
        json={"name": "scale", **spec},
        headers=MASTER,
    )
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def answered_by(cluster: Cluster, ids: list[str]) -> dict[str, str]:
    """The replica that answered each call, from nginx's access log (written once a response is out)."""
    tried = wait_until(lambda: (seen := cluster.nginx.replicas_by_request()).keys() >= set(ids) and seen)
    return {request_id: tried[request_id][-1] for request_id in ids}


def one_row_each(cluster: Cluster, ids: list[str]) -> list[dict[str, Any]]:
    rows = wait_for_rows(cluster.database_url, *ids, timeout=20)
    assert sorted(row["client_request_id"] for row in rows) == sorted(ids)
    return rows


def test_every_call_through_nginx_has_exactly_one_row(cluster: Cluster) -> None:
    cluster.fake.reset()
    ids = new_ids("mix", 36)
    with cluster.sdk() as sdk, concurrent.futures.ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(lambda i: chat(sdk, ids[i], stream=i % 2 == 1), range(len(ids))))
    assert texts == [WORDS] * len(ids)
    rows = one_row_each(cluster, ids)
    assert sorted(row["stream"] for row in rows) == [False] * 18 + [True] * 18
    assert all(row["status_code"] == 200 and row["completion_tokens"] > 0 for row in rows)
    # All three replicas took calls and wrote their rows into the one table.
    assert set(answered_by(cluster, ids).values()) == set(cluster.addresses)
    assert len(cluster.fake.requests) == len(ids)


def test_an_rpm_limit_holds_across_the_replicas_as_if_there_were_one(cluster: Cluster) -> None:
    cluster.fake.reset()
    key = make_key(cluster, rpm_limit=10)
    ids = new_ids("rpm", 30)

    def call(i: int) -> int:
        try:
            chat(sdk, ids[i], stream=i % 2 == 1)
            return 200
        except openai.RateLimitError as exc:
            assert exc.code == "rate_limit_exceeded"
            return 429

    with cluster.sdk(api_key=key["secret"]) as sdk, concurrent.futures.ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(call, range(len(ids))))
    assert statuses.count(200) == 10
    assert statuses.count(429) == 20
    assert len(cluster.fake.requests) == 10
    assert set(answered_by(cluster, ids).values()) == set(cluster.addresses)
    admitted = [request_id for request_id, status in zip(ids, statuses, strict=True) if status == 200]
    one_row_each(cluster, admitted)
    # A call the gateway refused itself never reached the upstream and leaves no row.
    assert usage_rows(cluster.database_url, *(set(ids) - set(admitted))) == []


def spent(cluster: Cluster, scope: str) -> Decimal:
    url = cluster.nginx.base_url.removesuffix("/v1") + "/admin/budgets"
    rows = httpx.get(url, headers=MASTER).json()["data"]
    return next(Decimal(row["spent_usd"]) for row in rows if row["scope"] == scope and row["period"] == "day")


def test_a_budget_holds_across_the_replicas(cluster: Cluster) -> None:
    cluster.fake.reset()
    with cluster.sdk() as sdk:
        # Spent through whichever replicas nginx picks, counted in one ledger.
        paid = new_ids("budget", 2)
        for n, request_id in enumerate(paid, start=1):
            cluster.fake.reply(usage=EXPENSIVE)
            chat(sdk, request_id, stream=n == 2, feature="scale-budget")
            wait_until(lambda n=n: spent(cluster, "feature:scale-budget") == n * CALL_COST)
        # Spent: every replica refuses, a stream as well.
        refused = new_ids("budget-refused", 3)
        for n, request_id in enumerate(refused):
            with pytest.raises(openai.RateLimitError) as caught:
                chat(sdk, request_id, stream=n == 0, feature="scale-budget")
            assert caught.value.code == "budget_exceeded"
    assert set(answered_by(cluster, refused).values()) == set(cluster.addresses)
    assert len(cluster.fake.requests) == 2
    one_row_each(cluster, paid)


def test_a_burst_of_concurrent_calls_is_charged_to_one_budget(cluster: Cluster) -> None:
    cluster.fake.reset()
    ids = new_ids("burst", BURST)
    for _ in ids:
        cluster.fake.reply(usage=EXPENSIVE)
    start = threading.Barrier(BURST)

    def call(request_id: str) -> bool:
        start.wait(timeout=10)
        try:
            chat(sdk, request_id, stream=False, feature="scale-burst", max_tokens=BURST_MAX_TOKENS)
            return True
        except openai.RateLimitError as exc:
            assert exc.code == "budget_exceeded"
            return False

    with cluster.sdk() as sdk, concurrent.futures.ThreadPoolExecutor(BURST) as pool:
        admitted = sum(pool.map(call, ids))
    assert admitted == 2
    # Every replica's charges land in the one ledger: the spend is that of every call admitted.
    wait_until(lambda: spent(cluster, "feature:scale-burst") == admitted * CALL_COST)
    with cluster.sdk() as sdk, pytest.raises(openai.RateLimitError) as caught:
        chat(sdk, new_ids("burst-after", 1)[0], stream=False, feature="scale-burst")
    assert caught.value.code == "budget_exceeded"


def test_a_key_revoked_through_one_replica_is_refused_by_the_others_at_once(cluster: Cluster) -> None:
    cluster.fake.reset()
    key = make_key(cluster)
    direct = [sdk_client(replica.url + "/v1", api_key=key["secret"]) for replica in cluster.replicas]
    try:
        # Every replica has the key in its cache (30 s).
        for sdk in direct:
            assert [m.id for m in sdk.models.list()]
        revoked = httpx.delete(cluster.replicas[0].url + f"/admin/keys/{key['id']}", headers=MASTER)
        assert revoked.json()["revoked_at"] is not None

        def refused(sdk: openai.OpenAI) -> bool:
            try:
                sdk.models.list()
            except openai.AuthenticationError:
                return True
            return False

        # Well inside the cache's lifetime: the others heard of it through Postgres NOTIFY.
        for sdk in direct:
            wait_until(lambda sdk=sdk: refused(sdk), timeout=2)
    finally:
        for sdk in direct:
            sdk.close()
    ids = new_ids("revoked", 3)
    # As the SDK runs by default (max_retries=2): a refused call's body is left unread, and nginx may
    # close the kept-alive connection to the client after answering it, which the SDK's next call then
    # meets as a connection error and retries. A 401 itself is never retried.
    with cluster.sdk(api_key=key["secret"], max_retries=2) as sdk:
        for request_id in ids:
            with pytest.raises(openai.AuthenticationError):
                chat(sdk, request_id, stream=False)
    assert set(answered_by(cluster, ids).values()) == set(cluster.addresses)


def test_a_background_response_seen_finished_by_every_replica_has_one_row(cluster: Cluster) -> None:
    cluster.fake.reset()
    cluster.fake.reply("done in the background", usage={"input_tokens": 50, "output_tokens": 20})
    with cluster.sdk() as sdk:
        created = sdk.responses.create(model="gpt-4o-mini", input="long job", background=True)
    direct = [sdk_client(replica.url + "/v1") for replica in cluster.replicas]
    try:
        wait_until(lambda: direct[0].responses.retrieve(created.id).status == "completed", timeout=10)
        # Each replica meters the response the first time it sees it finished, under its id and its own
        # created_at: three events, one row.
        for sdk in direct:
            assert sdk.responses.retrieve(created.id).status == "completed"
        markers = new_ids("after-background", len(direct))
        for sdk, request_id in zip(direct, markers, strict=True):
            chat(sdk, request_id, stream=False)
    finally:
        for sdk in direct:
            sdk.close()
    # Each replica's later call is written, so its earlier event is too.
    one_row_each(cluster, markers)
    rows = usage_rows(cluster.database_url, created.id)
    assert len(rows) == 1
    assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (50, 20)


def test_a_replica_stopped_mid_traffic_drains_its_streams_while_nginx_sends_new_calls_elsewhere(
    cluster: Cluster,
) -> None:
    fake, victim = cluster.fake, cluster.replicas[0]
    victim_address = f"127.0.0.1:{victim.port}"
    fake.reset()
    # Streams of ~4 s: still running when the replica is told to stop.
    fake.inter_token_delay_s = 0.2
    streams = new_ids("drain", 6)
    later = new_ids("after-stop", 9)
    first_chunk = {request_id: threading.Event() for request_id in streams}

    def long_stream(sdk: openai.OpenAI, request_id: str) -> str:
        chunks = sdk.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"X-Request-Id": request_id},
        )
        text, usage = "", None
        for chunk in chunks:
            first_chunk[request_id].set()
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            usage = chunk.usage or usage
        assert usage is not None
        return text

    try:
        with cluster.sdk(timeout=30) as sdk, concurrent.futures.ThreadPoolExecutor(16) as pool:
            running = [pool.submit(long_stream, sdk, request_id) for request_id in streams]
            for request_id in streams:
                assert first_chunk[request_id].wait(timeout=15)
            assert victim.proc is not None
            victim.proc.send_signal(signal.SIGTERM)
            # It stops taking connections at once, and keeps running while its streams drain.
            wait_until(lambda: not accepts(victim.port), timeout=10)
            assert victim.proc.poll() is None
            assert not all(future.done() for future in running)
            after = [
                pool.submit(chat, sdk, request_id, stream=i % 2 == 1) for i, request_id in enumerate(later)
            ]
            assert [future.result(timeout=30) for future in after] == [WORDS] * len(later)
            assert [future.result(timeout=30) for future in running] == [WORDS] * len(streams)
        # uvicorn re-raises the signal once it has shut down cleanly.
        assert victim.proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        fake.inter_token_delay_s = 0.0
    tried = wait_until(
        lambda: (seen := cluster.nginx.replicas_by_request()).keys() >= {*streams, *later} and seen
    )
    # nginx's round robin gave the stopped replica some of the streams, which it finished before exiting.
    assert any(tried[request_id][-1] == victim_address for request_id in streams)
    # New calls went to the others; the one nginx first offered to the stopped replica was passed on.
    assert all(tried[request_id][-1] != victim_address for request_id in later)
    assert any(victim_address in tried[request_id] for request_id in later)
    # Nothing lost: the stopped replica flushed its rows before it exited.
    rows = one_row_each(cluster, streams + later)
    assert all(row["status_code"] == 200 for row in rows)
