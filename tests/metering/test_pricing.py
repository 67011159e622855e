from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

import pytest
import yaml

from app.call.record import Usage
from app.metering.pricing import (
    ModelPrice,
    PriceTable,
    TokenCounts,
    family_of,
    override_version,
    rate_tier,
    shipped_prices,
)

REQUIRED_MODELS = [
    "gpt-5",
    "gpt-5-mini",
    "gpt-5-nano",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "gpt-4o",
    "gpt-4o-mini",
    "o1",
    "o1-mini",
    "o3",
    "o3-mini",
    "o4-mini",
    "gpt-4-turbo",
    "gpt-4",
    "gpt-3.5-turbo",
    "text-embedding-3-small",
    "text-embedding-3-large",
    "text-embedding-ada-002",
]

# Snapshots whose price differs from their family's, so they are entries of their own.
EXACT_SNAPSHOTS = {"gpt-4o-2024-05-13", "gpt-3.5-turbo-1106", "gpt-3.5-turbo-0613", "gpt-3.5-turbo-0301"}


@pytest.fixture
def table() -> PriceTable:
    return PriceTable()


def test_shipped_file_has_provenance_and_the_required_models() -> None:
    shipped = shipped_prices()
    assert shipped.as_of
    assert "OpenAI" in shipped.source
    assert set(REQUIRED_MODELS) <= set(shipped.models)


def test_shipped_entries_are_consistent() -> None:
    for name, price in shipped_prices().models.items():
        assert name == name.strip().lower()
        assert price.cached_rate_per_1m <= price.input_per_1m, name
        if name not in EXACT_SNAPSHOTS:
            assert family_of(name) == name, name


@pytest.mark.parametrize(
    ("model", "input_per_1m", "cached_per_1m", "output_per_1m"),
    [
        ("gpt-5", "1.25", "0.125", "10"),
        ("gpt-5-mini", "0.25", "0.025", "2"),
        ("gpt-5-nano", "0.05", "0.005", "0.40"),
        ("gpt-4.1", "2", "0.5", "8"),
        ("gpt-4.1-mini", "0.4", "0.1", "1.6"),
        ("gpt-4.1-nano", "0.1", "0.025", "0.4"),
        ("gpt-4o", "2.5", "1.25", "10"),
        ("gpt-4o-mini", "0.15", "0.075", "0.6"),
        ("o1", "15", "7.5", "60"),
        ("o1-mini", "1.1", "0.55", "4.4"),
        ("o3", "2", "0.5", "8"),
        ("o3-mini", "1.1", "0.55", "4.4"),
        ("o4-mini", "1.1", "0.275", "4.4"),
        ("gpt-4-turbo", "10", "10", "30"),
        ("gpt-4", "30", "30", "60"),
        ("gpt-3.5-turbo", "0.5", "0.5", "1.5"),
        ("text-embedding-3-small", "0.02", "0.02", "0"),
        ("text-embedding-3-large", "0.13", "0.13", "0"),
        ("text-embedding-ada-002", "0.1", "0.1", "0"),
    ],
)
def test_shipped_prices(
    table: PriceTable, model: str, input_per_1m: str, cached_per_1m: str, output_per_1m: str
) -> None:
    price = table.price_for(model)
    assert price is not None
    assert price.input_per_1m == Decimal(input_per_1m)
    assert price.cached_rate_per_1m == Decimal(cached_per_1m)
    assert price.output_per_1m == Decimal(output_per_1m)


@pytest.mark.parametrize(
    ("model", "entry"),
    [
        ("gpt-4o", "gpt-4o"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-2024-11-20", "gpt-4o"),
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),
        ("gpt-4o-mini", "gpt-4o-mini"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4.1-2025-04-14", "gpt-4.1"),
        ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
        ("gpt-4.1-nano-2025-04-14", "gpt-4.1-nano"),
        ("gpt-5-2025-08-07", "gpt-5"),
        ("gpt-5-mini-2025-08-07", "gpt-5-mini"),
        ("gpt-5-nano-2025-08-07", "gpt-5-nano"),
        ("o1-2024-12-17", "o1"),
        ("o1-mini-2024-09-12", "o1-mini"),
        ("o3-2025-04-16", "o3"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("o4-mini-2025-04-16", "o4-mini"),
        ("gpt-4-turbo-2024-04-09", "gpt-4-turbo"),
        ("gpt-4-0613", "gpt-4"),
        ("gpt-4-0314", "gpt-4"),
        ("gpt-4-32k-0613", "gpt-4-32k"),
        ("gpt-4-0125-preview", "gpt-4-0125-preview"),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
        ("gpt-3.5-turbo-1106", "gpt-3.5-turbo-1106"),
        ("gpt-3.5-turbo-16k-0613", "gpt-3.5-turbo-16k"),
        ("GPT-4o-Mini", "gpt-4o-mini"),
        (" gpt-4o ", "gpt-4o"),
        ("text-embedding-3-small", "text-embedding-3-small"),
    ],
)
def test_snapshot_resolution(table: PriceTable, model: str, entry: str) -> None:
    assert table.resolve(model) == entry


@pytest.mark.parametrize(
    "model",
    [
        "gpt-4o-search-preview",  # priced differently from gpt-4o: no prefix guessing
        "gpt-4o-mini-tts",
        "ft:gpt-4o-mini-2024-07-18:acme::abc123",
        "gpt-4o-2024-13-01",  # not a date, so not a snapshot suffix
        "gpt-4-9999",
        "gpt-6",
        "",
    ],
)
def test_unresolved_models(table: PriceTable, model: str) -> None:
    assert table.resolve(model) is None
    assert table.price_for(model) is None


def test_family_of() -> None:
    assert family_of("gpt-4o-mini-2024-07-18") == "gpt-4o-mini"
    assert family_of("gpt-4-0613") == "gpt-4"
    assert family_of("gpt-4-0125-preview") == "gpt-4-0125-preview"
    assert family_of("text-embedding-3-small") == "text-embedding-3-small"


@pytest.mark.parametrize(
    ("model", "prompt", "completion", "cached", "expected"),
    [
        # 1000 * 2.50 + 500 * 10.00 = 7500 per 1M
        ("gpt-4o", 1000, 500, 0, "0.0075"),
        # 600 uncached * 2.50 + 400 cached * 1.25 + 200 * 10.00 = 1500 + 500 + 2000 = 4000 per 1M
        ("gpt-4o-2024-08-06", 1000, 200, 400, "0.004"),
        # the older snapshot has its own price and no cache discount: 1000 * 5 + 200 * 15 = 8000 per 1M
        ("gpt-4o-2024-05-13", 1000, 200, 400, "0.008"),
        # 976 * 1.10 + 1024 * 0.275 + 3000 (reasoning included) * 4.40 = 1073.6 + 281.6 + 13200
        ("o4-mini", 2000, 3000, 1024, "0.0145552"),
        # no cached rate, so cached tokens cost the input rate: 1000 * 30 + 100 * 60 = 36000 per 1M
        ("gpt-4", 1000, 100, 500, "0.036"),
        # 12345 * 0.02 = 246.9 per 1M
        ("text-embedding-3-small", 12345, 0, 0, "0.0002469"),
        # one cached token of gpt-5-nano: 0.005 per 1M
        ("gpt-5-nano", 1, 0, 1, "0.000000005"),
        # 100k prompt (90k cached) + 20k output on gpt-5: 10000 * 1.25 + 90000 * 0.125 + 20000 * 10
        ("gpt-5", 100_000, 20_000, 90_000, "0.22375"),
        ("gpt-4o-mini", 0, 0, 0, "0"),
    ],
)
def test_cost_usd(
    table: PriceTable, model: str, prompt: int, completion: int, cached: int, expected: str
) -> None:
    cost = table.cost_usd(model, prompt, completion, cached)
    assert cost == Decimal(expected)
    assert cost is not None
    assert cost.as_tuple().exponent == -10


def test_cached_tokens_are_a_subset_of_prompt_tokens(table: PriceTable) -> None:
    all_cached = table.cost_usd("gpt-4o", 1000, 0, 1000)
    none_cached = table.cost_usd("gpt-4o", 1000, 0, 0)
    assert all_cached == Decimal("0.00125")
    assert none_cached == Decimal("0.0025")
    # An upstream reporting more cached than prompt tokens is clamped to the prompt.
    assert table.cost_usd("gpt-4o", 1000, 0, 5000) == all_cached
    assert table.cost_usd("gpt-4o", -5, -5, -5) == Decimal(0)


def test_cost_is_quantized_half_even() -> None:
    prices = {
        "tiny": {"input_per_1m": "0.00015", "output_per_1m": "0.00005"},
    }
    table = PriceTable(prices)
    assert table.cost_usd("tiny", 1, 0) == Decimal("0.0000000002")  # 1.5e-10 -> 2e-10
    assert table.cost_usd("tiny", 0, 1) == Decimal("0")  # 0.5e-10 -> 0


def test_unknown_model_is_none_warned_once_and_reported_every_time(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []
    table = PriceTable(on_unknown=seen.append)
    with caplog.at_level(logging.WARNING, logger="app.metering.pricing"):
        for _ in range(3):
            assert table.cost_usd("mystery-model", 10, 10, 0) is None
        assert table.cost_usd("other-mystery", 10, 10, 0) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage().split(":")[0] for r in warnings] == [
        "no price for model 'mystery-model'",
        "no price for model 'other-mystery'",
    ]
    assert seen == ["mystery-model"] * 3 + ["other-mystery"]


def test_no_model_is_none_without_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []
    table = PriceTable(on_unknown=seen.append)
    with caplog.at_level(logging.WARNING, logger="app.metering.pricing"):
        assert table.cost_usd(None, 10, 10) is None
        assert table.cost_usd("", 10, 10) is None
        assert table.cost_usd(42, 10, 10) is None  # type: ignore[arg-type]
    assert caplog.records == []
    assert seen == []


def test_a_failing_hook_does_not_break_costing(caplog: pytest.LogCaptureFixture) -> None:
    def broken(model: str) -> None:
        raise RuntimeError("metrics are down")

    table = PriceTable(on_unknown=broken)
    with caplog.at_level(logging.WARNING, logger="app.metering.pricing"):
        assert table.cost_usd("mystery-model", 1, 1) is None
    assert any(r.levelno == logging.ERROR and "on_unknown" in r.getMessage() for r in caplog.records)


OPERATOR_YAML = """
prices:
  gpt-4o:
    input_per_1m: 2.00
    output_per_1m: 8.00
  ft:gpt-4o-mini-2024-07-18:acme::abc123:
    input_per_1m: 0.30
    cached_input_per_1m: 0.15
    output_per_1m: 1.20
  Gpt-7:
    input_per_1m: "3"
    output_per_1m: 12
"""


def test_overrides_from_yaml() -> None:
    overrides = yaml.safe_load(OPERATOR_YAML)["prices"]
    table = PriceTable(overrides)
    # An override replaces the whole entry: no cached rate stated, so cached tokens cost the input rate.
    assert table.cost_usd("gpt-4o", 1000, 100, 500) == Decimal("0.0028")
    # The family override reaches dated snapshots, but an exact snapshot entry still wins.
    assert table.resolve("gpt-4o-2024-08-06") == "gpt-4o"
    assert table.cost_usd("gpt-4o-2024-08-06", 1000, 100) == Decimal("0.0028")
    assert table.cost_usd("gpt-4o-2024-05-13", 1000, 100) == Decimal("0.0065")
    # YAML floats become exact decimals: 1M * 0.30 is 0.30, not 0.2999999…
    fine_tuned = "ft:gpt-4o-mini-2024-07-18:acme::abc123"
    assert table.cost_usd(fine_tuned, 1_000_000, 0) == Decimal("0.3")
    assert table.cost_usd(fine_tuned, 1_000_000, 0, 1_000_000) == Decimal("0.15")
    assert table.cost_usd("gpt-7", 1_000_000, 1_000_000) == Decimal("15")
    # Untouched entries keep the shipped price, and the shipped table itself is not modified.
    assert table.cost_usd("gpt-4o-mini", 1_000_000, 0) == Decimal("0.15")
    assert PriceTable().cost_usd("gpt-4o", 1000, 100) == Decimal("0.0035")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"gpt-4o": {"input_per_1m": -1, "output_per_1m": 8}},
            r"gpt-4o\.input_per_1m: .*greater than or equal",
        ),
        (
            {"gpt-4o": {"input_per_1m": 1, "cached_input_per_1m": -0.5, "output_per_1m": 8}},
            r"gpt-4o\.cached_input_per_1m",
        ),
        (
            {"gpt-4o": {"input_per_1m": 1, "output_per_1m": 8, "input_per_1k": 1}},
            r"gpt-4o\.input_per_1k: Extra",
        ),
        ({"gpt-4o": {"input_per_1m": 1}}, r"gpt-4o\.output_per_1m: Field required"),
        ({"gpt-4o": {"input_per_1m": float("nan"), "output_per_1m": 1}}, r"finite"),
        ({"gpt-4o": {"input_per_1m": "cheap", "output_per_1m": 1}}, r"gpt-4o\.input_per_1m"),
        ({"gpt-4o": {"input_per_1m": True, "output_per_1m": 1}}, r"gpt-4o\.input_per_1m"),
        ({"gpt-4o": None}, r"gpt-4o"),
        (["gpt-4o"], r"valid dictionary"),
    ],
)
def test_invalid_overrides_are_a_clear_value_error(overrides: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PriceTable(overrides)


def test_model_price_is_immutable() -> None:
    price = ModelPrice(input_per_1m=Decimal(1), output_per_1m=Decimal(2))
    with pytest.raises(ValueError, match="frozen"):
        price.input_per_1m = Decimal(0)  # type: ignore[misc]


def _usd(table: PriceTable, model: str, tokens: tuple[int, ...], tier: str) -> Decimal | None:
    units = table.price(model, tier, *tokens).cost_units
    return None if units is None else Decimal(units).scaleb(-10)


MILLION = (1_000_000, 1_000_000)


@pytest.mark.parametrize(
    ("service_tier", "tier"),
    [
        (None, "standard"),
        ("default", "standard"),
        ("auto", "standard"),
        ("scale", "standard"),
        ("flex", "flex"),
        ("priority", "priority"),
        ("batch", "batch"),
        ("made-up", "standard"),
    ],
)
def test_rate_tier(service_tier: str | None, tier: str) -> None:
    assert rate_tier(service_tier) == tier


def test_tiers_price_at_their_own_rates(table: PriceTable) -> None:
    # gpt-5-mini: $0.25 in / $2 out standard; priority $0.45 / $3.60; batch and flex half of standard.
    assert _usd(table, "gpt-5-mini", MILLION, "standard") == Decimal("2.25")
    assert _usd(table, "gpt-5-mini", MILLION, "priority") == Decimal("4.05")
    assert _usd(table, "gpt-5-mini", MILLION, "batch") == Decimal("1.125")
    assert _usd(table, "gpt-5-mini-2025-08-07", MILLION, "flex") == Decimal("1.125")
    cached = (1_000_000, 0, 1_000_000)
    assert _usd(table, "gpt-5-mini", cached, "batch") == Decimal("0.0125")


def test_a_tier_without_published_rates_is_unpriced_not_standard(
    table: PriceTable, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []
    hooked = PriceTable(on_unknown=seen.append)
    with caplog.at_level(logging.WARNING, logger="app.metering.pricing"):
        assert hooked.price("gpt-5-nano", "priority", *MILLION) == (None, None, None)
    # A known model: not counted as an unknown one, but warned about.
    assert seen == []
    assert "gpt-5-nano@priority" in caplog.text


def test_provenance_names_entry_tier_and_version(table: PriceTable) -> None:
    priced = table.price("gpt-4o-mini-2024-07-18", "flex", *MILLION)
    assert priced.price_key == "gpt-4o-mini@flex"
    assert priced.price_version == shipped_prices().as_of
    assert table.lookup("gpt-4o-mini-2024-07-18", "flex") == ("gpt-4o-mini@flex", shipped_prices().as_of)
    assert table.lookup("no-such-model", "standard") is None
    override = {"gpt-4o-mini": {"input_per_1m": 1, "output_per_1m": 2}}
    mine = PriceTable(override)
    key, version = mine.lookup("gpt-4o-mini", "standard") or ("", "")
    assert key == "gpt-4o-mini@standard"
    assert version == override_version(ModelPrice.model_validate(override["gpt-4o-mini"]))
    assert version.startswith("config:")
    changed = PriceTable({"gpt-4o-mini": {"input_per_1m": 1, "output_per_1m": 3}})
    assert changed.lookup("gpt-4o-mini", "standard") != (key, version)


def test_audio_and_image_tokens_at_their_own_rates(table: PriceTable) -> None:
    # gpt-4o-audio-preview: text $2.50 in / $10 out, audio $40 in / $80 out.
    counts = (1_000_000, 1_000_000, 0, 400_000, 250_000)
    expected = (
        Decimal("0.6") * Decimal("2.5") + Decimal("0.4") * 40 + Decimal("0.75") * 10 + Decimal("0.25") * 80
    )
    assert _usd(table, "gpt-4o-audio-preview", counts, "standard") == expected
    # gpt-image-1: text $5 in, image $10 in, output (image) $40.
    image = (1_000, 4_000, 0, 0, 0, 600)
    # 400 text tokens at $5, 600 image tokens at $10, 4,000 output tokens at $40.
    assert _usd(table, "gpt-image-1", image, "standard") == Decimal("0.168")
    # A model without audio rates prices audio tokens at its text rates.
    assert _usd(table, "gpt-4o-mini", counts, "standard") == _usd(table, "gpt-4o-mini", MILLION, "standard")


def test_subsets_never_bill_more_than_their_total() -> None:
    counts = TokenCounts.split(100, 10, cached=500, audio_prompt=80, image_prompt=80, audio_completion=50)
    assert counts == TokenCounts(0, 0, 0, 80, 10, 20, 0)
    assert sum(counts) == 110


@pytest.mark.parametrize(
    "counts",
    [
        {"prompt": 1200, "completion": 300, "cached": 1000},
        {"prompt": 10, "completion": 5, "cached": 50},  # cached > prompt
        {"prompt": -3, "completion": -1},  # an upstream's nonsense: billed as nothing
        {"prompt": 900, "completion": 200, "audio_prompt": 300, "audio_completion": 50},
        {"prompt": 900, "completion": 200, "image_prompt": 400, "image_completion": 20},
    ],
)
@pytest.mark.parametrize(
    ("model", "tier"),
    [
        ("gpt-4o-mini", "standard"),
        ("gpt-5-mini-2025-08-07", "flex"),
        ("gpt-4o-audio-preview", "standard"),
        ("gpt-image-1", "standard"),
        ("gpt-5-nano", "priority"),  # a tier without rates
        ("no-such-model", "standard"),
        (None, "standard"),
        ("", "standard"),
    ],
)
def test_a_calls_usage_is_priced_as_its_counts_are(
    counts: dict[str, int], model: str | None, tier: str
) -> None:
    """price_usage, the metered call's way in (text-only calls of a model priced before skip the general
    path), prices exactly as price() does with the same counts, the first time and every time after."""
    usage = Usage(**{f"{name}_tokens": count for name, count in counts.items()})
    expected = PriceTable().price(model, tier, **counts)
    table = PriceTable()
    assert [table.price_usage(model, tier, usage) for _ in range(3)] == [expected] * 3
    if model in ("gpt-4o-mini", "gpt-5-mini-2025-08-07") and counts["prompt"] > 0:
        assert expected.cost_units
