"""`llm-gateway prices unpriced` finds the models seen without a price; `llm-gateway reprice` prices their
rows once a price exists, usage_daily with them, and is idempotent."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import openai
import orjson
import pytest

from app.cli import main
from app.metering import repricing
from tests.conftest import sdk_client
from tests.db import fetch, wait_for_rows
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import ThreadedGateway

MESSAGES = [{"role": "user", "content": "Say hello"}]


def _call(
    client: openai.OpenAI, fake: FakeOpenAI, model: str, prompt: int, completion: int, **extra: str
) -> str:
    request_id = f"reprice-{uuid.uuid4().hex}"
    fake.reply("Hi!", usage={"prompt_tokens": prompt, "completion_tokens": completion}, model=model)
    client.chat.completions.create(
        model=model,
        messages=MESSAGES,  # type: ignore[arg-type]
        extra_headers={"X-Request-Id": request_id, "X-Feature": "f", "X-User-Id": "u"},
        **extra,  # type: ignore[arg-type]
    )
    return request_id


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def _daily_cost(url: str, model: str) -> Decimal:
    rows = fetch(url, "SELECT coalesce(sum(cost_usd), 0) AS cost FROM usage_daily WHERE model = $1", model)
    cost: Decimal = rows[0]["cost"]
    return cost


def test_unpriced_then_repriced_once(
    scratch_db: tuple[str, str],
    start_gateway: Callable[..., ThreadedGateway],
    fake: FakeOpenAI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, url = scratch_db
    # Pages of two rows: the three standard-tier rows take two.
    monkeypatch.setattr(repricing, "_PAGE", 2)
    gateway = start_gateway(database_url=url)
    with sdk_client(gateway.base_url) as client:
        new = [_call(client, fake, "acme-new-model", 1000, 100) for _ in range(3)]
        flex = _call(client, fake, "acme-new-model", 2000, 0, service_tier="flex")
        known = _call(client, fake, "gpt-4o-mini", 1000, 100)
    rows = wait_for_rows(url, *new, flex, known)
    assert [row["cost_usd"] for row in rows[:4]] == [None] * 4
    monkeypatch.setenv("DATABASE_URL", url)

    code, out = _cli(capsys, "prices", "unpriced", "--since", "30d", "--format", "json")
    assert code == 0
    found = {(r["model"], r["service_tier"]): r for r in orjson.loads(out)}
    assert set(found) == {("acme-new-model", "default"), ("acme-new-model", "flex")}
    assert (
        found["acme-new-model", "default"]["calls"],
        found["acme-new-model", "default"]["prompt_tokens"],
    ) == (
        3,
        3000,
    )
    assert _daily_cost(url, "acme-new-model") == 0
    known_before = _daily_cost(url, "gpt-4o-mini")

    # The operator adds its price.
    config = tmp_path / "gateway.yaml"
    config.write_text("prices:\n  acme-new-model: {input_per_1m: 1, output_per_1m: 10}\n")
    monkeypatch.setenv("GATEWAY_CONFIG", str(config))
    # 3 x (1000 * $1 + 100 * $10) / 1M, and the flex call at half: 2000 * $0.5 / 1M.
    expected = Decimal("0.006") + Decimal("0.001")

    code, out = _cli(capsys, "reprice", "--since", "1d", "--dry-run", "--format", "json")
    assert code == 0
    (delta,) = orjson.loads(out)
    assert (delta["model"], delta["rows"], Decimal(delta["delta_usd"])) == ("acme-new-model", 4, expected)
    assert _daily_cost(url, "acme-new-model") == 0, "a dry run writes nothing"

    code, out = _cli(capsys, "reprice", "--since", "1d")
    assert code == 0 and "acme-new-model" in out
    priced = wait_for_rows(url, *new, flex)
    assert [row["cost_usd"] for row in priced] == [Decimal("0.002")] * 3 + [Decimal("0.001")]
    assert {row["price_key"] for row in priced} == {"acme-new-model@standard", "acme-new-model@flex"}
    assert all(row["price_version"].startswith("config:") for row in priced)
    assert _daily_cost(url, "acme-new-model") == expected
    assert _daily_cost(url, "gpt-4o-mini") == known_before

    # Idempotent: nothing left to change.
    code, out = _cli(capsys, "reprice", "--since", "1d", "--format", "json")
    assert (code, orjson.loads(out)) == (0, [])
    assert _daily_cost(url, "acme-new-model") == expected
    code, out = _cli(capsys, "prices", "unpriced", "--since", "30d", "--format", "json")
    assert orjson.loads(out) == []

    # A changed price changes the entry's version: its rows are re-priced by the difference.
    config.write_text("prices:\n  acme-new-model: {input_per_1m: 2, output_per_1m: 10}\n")
    code, out = _cli(capsys, "reprice", "--since", "1d", "--model", "acme-new-model", "--format", "json")
    (delta,) = orjson.loads(out)
    assert Decimal(delta["delta_usd"]) == Decimal("0.003") + Decimal("0.001")
    assert _daily_cost(url, "acme-new-model") == expected + Decimal("0.004")


def test_reprice_model_filter_and_bad_since(
    scratch_db: tuple[str, str],
    start_gateway: Callable[..., ThreadedGateway],
    fake: FakeOpenAI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, url = scratch_db
    gateway = start_gateway(database_url=url)
    with sdk_client(gateway.base_url) as client:
        first = _call(client, fake, "acme-one", 1000, 0)
        second = _call(client, fake, "acme-two", 1000, 0)
    wait_for_rows(url, first, second)
    monkeypatch.setenv("DATABASE_URL", url)
    config = tmp_path / "gateway.yaml"
    rates = "{input_per_1m: 1, output_per_1m: 1}"
    config.write_text(f"prices:\n  acme-one: {rates}\n  acme-two: {rates}\n")
    monkeypatch.setenv("GATEWAY_CONFIG", str(config))
    code, out = _cli(capsys, "reprice", "--since", "1d", "--model", "acme-one", "--format", "json")
    assert code == 0
    assert [d["model"] for d in orjson.loads(out)] == ["acme-one"]
    (one,) = wait_for_rows(url, first)
    (two,) = wait_for_rows(url, second)
    assert (one["cost_usd"], two["cost_usd"]) == (Decimal("0.001"), None)
    assert main(["reprice", "--since", "yesterday"]) == 2


def test_prices_list_and_show(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    code, out = _cli(capsys, "prices", "list", "--format", "json")
    listed = {row["model"]: row for row in orjson.loads(out)}
    assert code == 0 and {"gpt-6-sol", "gpt-5-mini", "gpt-realtime", "text-embedding-3-small"} <= set(listed)
    assert listed["gpt-5-mini"]["priority"] == "yes" and listed["gpt-realtime"]["media"] == "yes"

    code, out = _cli(capsys, "prices", "show", "gpt-5-mini-2025-08-07")
    assert code == 0
    assert "priced by the entry 'gpt-5-mini'" in out
    tiers = {line.split()[0]: line.split()[1:] for line in out.splitlines()[3:]}
    assert tiers["standard"] == ["0.25", "0.025", "2.00"]
    assert tiers["batch"] == tiers["flex"] == ["0.125", "0.0125", "1.00"]
    assert tiers["priority"] == ["0.45", "0.045", "3.6"]

    code, out = _cli(capsys, "prices", "show", "acme-unknown")
    assert code == 1 and "no price" in out

    config = tmp_path / "gateway.yaml"
    config.write_text("prices:\n  acme-unknown: {input_per_1m: 1, output_per_1m: 2}\n")
    monkeypatch.setenv("GATEWAY_CONFIG", str(config))
    code, out = _cli(capsys, "prices", "show", "acme-unknown")
    assert code == 0 and "version config:" in out
