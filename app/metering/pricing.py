"""Model prices (USD per 1M tokens) and the cost of one call.

The shipped table (``prices.json``) is OpenAI's standard tier; an operator's overrides replace whole
entries, so an override never inherits a cached rate it did not state.

Resolution is deliberately narrow: the exact name, else the name without a trailing snapshot date
(``-YYYY-MM-DD`` or ``-MMDD``), so ``gpt-4o-mini-2024-07-18`` is ``gpt-4o-mini`` and never ``gpt-4o``.
There is no prefix guessing: ``gpt-4o-realtime-preview`` or ``ft:gpt-4o-mini:…`` are priced differently
from their base model, and an unknown model (warned once, counted by ``on_unknown``) is better than a
silently wrong cost.

Cached input tokens are a subset of the prompt tokens and reasoning tokens a subset of the completion
tokens, as OpenAI's usage object reports them, so neither is ever added on top; so are audio and image
tokens (``prompt_tokens_details.audio_tokens``, ``input_tokens_details.image_tokens``, …), priced at
their own rate where the entry has one and at the text rate otherwise.

Service tiers: a call is priced at the rates of the tier the response reports. ``default`` (and ``auto``,
``scale``, or none reported) is the entry's own rates; ``batch`` (Batch API lines) its ``batch`` rates,
else half its own, as OpenAI discounts every batchable model; ``flex`` its ``flex`` rates, else its batch
rates (OpenAI prices Flex at Batch rates); ``priority`` its ``priority`` rates, else no price at all: a
priority call priced at standard rates would be silently wrong by 2x or more.

Provenance: every priced call names the entry and tier that priced it (``gpt-5-mini@flex``) and that
entry's version: the shipped table's ``as_of`` date, or ``config:<hash>`` for an operator's entry, so
`llm-gateway reprice` can find the rows whose entry has changed since.
"""

from __future__ import annotations

import decimal
import functools
import hashlib
import importlib.resources
import json
import logging
import re
import threading
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, Final, Literal, NamedTuple, Protocol

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

logger = logging.getLogger(__name__)

UnknownModelHook = Callable[[str], None]

QUANTUM: Final = Decimal("1e-10")
_PER: Final = Decimal(1_000_000)
# A price per 1M tokens, times this, is the price of one token in units of QUANTUM.
_PER_TOKEN_UNITS: Final = Decimal(10_000)
_QUANTUM_EXPONENT: Final = -10
# Explicit context: the ambient decimal context is per thread and any library may change its precision
# or traps. 60 digits keeps quantize() exact far beyond any real token count.
_CTX: Final = decimal.Context(prec=60, rounding=decimal.ROUND_HALF_EVEN)

# Model names come from clients: both caches are bounded so random names cannot grow memory.
_MAX_RESOLVED: Final = 4096
_MAX_WARNED: Final = 1024

_SNAPSHOT_SUFFIX: Final = re.compile(
    r"-(?:\d{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])|(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01]))$"
)


class Rates(BaseModel):
    """One tier's rates, USD per 1M tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_1m: Decimal = Field(ge=0)
    cached_input_per_1m: Decimal | None = Field(default=None, ge=0)
    output_per_1m: Decimal = Field(ge=0)
    # Audio and image tokens, where the model prices them apart from text; None: the text rate.
    audio_input_per_1m: Decimal | None = Field(default=None, ge=0)
    audio_output_per_1m: Decimal | None = Field(default=None, ge=0)
    image_input_per_1m: Decimal | None = Field(default=None, ge=0)
    image_output_per_1m: Decimal | None = Field(default=None, ge=0)

    @property
    def cached_rate_per_1m(self) -> Decimal:
        # Models without prompt caching never report cached tokens; if one does, it paid full price.
        return self.input_per_1m if self.cached_input_per_1m is None else self.cached_input_per_1m

    def per_token(self) -> tuple[Decimal, ...]:
        """The rate of each kind of token, in TokenCounts' order."""
        text_in, text_out = self.input_per_1m, self.output_per_1m
        return (
            text_in,
            self.cached_rate_per_1m,
            text_out,
            text_in if self.audio_input_per_1m is None else self.audio_input_per_1m,
            text_out if self.audio_output_per_1m is None else self.audio_output_per_1m,
            text_in if self.image_input_per_1m is None else self.image_input_per_1m,
            text_out if self.image_output_per_1m is None else self.image_output_per_1m,
        )

    def halved(self) -> Rates:
        return Rates.model_validate(
            {name: None if (rate := getattr(self, name)) is None else rate / 2 for name in Rates.model_fields}
        )


class ModelPrice(Rates):
    """A model's standard rates, and those of the service tiers priced otherwise."""

    batch: Rates | None = None
    flex: Rates | None = None
    priority: Rates | None = None

    def rates_for(self, tier: str) -> Rates | None:
        if tier == "batch":
            return self.batch or self.halved()
        if tier == "flex":
            return self.flex or self.batch or self.halved()
        if tier == "priority":
            return self.priority
        return self


# The rate a call is priced at, by the service tier its response reports (or `batch`): every other value
# OpenAI sends (`default`, `auto`, `scale`) or none at all is the standard rate.
TIERS: Final = ("standard", "batch", "flex", "priority")


def rate_tier(service_tier: str | None) -> str:
    return service_tier if service_tier in ("batch", "flex", "priority") else "standard"


class TokenCounts(NamedTuple):
    """One call's tokens as priced: each subset already taken out of the text it is part of."""

    text_input: int
    cached_input: int
    text_output: int
    audio_input: int
    audio_output: int
    image_input: int
    image_output: int

    @classmethod
    def split(
        cls,
        prompt: int,
        completion: int,
        cached: int = 0,
        audio_prompt: int = 0,
        audio_completion: int = 0,
        image_prompt: int = 0,
        image_completion: int = 0,
    ) -> TokenCounts:
        """From the usage object's totals and their subsets. An upstream reporting more of a subset than
        its total is wrong: never bill more than the total."""
        prompt, completion = max(prompt, 0), max(completion, 0)
        audio_in = min(max(audio_prompt, 0), prompt)
        image_in = min(max(image_prompt, 0), prompt - audio_in)
        text_in = prompt - audio_in - image_in
        cached = min(max(cached, 0), text_in)
        audio_out = min(max(audio_completion, 0), completion)
        image_out = min(max(image_completion, 0), completion - audio_out)
        return cls(
            text_in - cached,
            cached,
            completion - audio_out - image_out,
            audio_in,
            audio_out,
            image_in,
            image_out,
        )


class UsageCounts(Protocol):
    """A call's usage as `app.call.record.Usage` holds it: the totals and their subsets."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    audio_prompt_tokens: int
    audio_completion_tokens: int
    image_prompt_tokens: int
    image_completion_tokens: int


class Priced(NamedTuple):
    """A call's cost in units of QUANTUM (None: no price) and the entry that priced it."""

    cost_units: int | None
    price_key: str | None
    price_version: str | None


_UNPRICED: Final = Priced(None, None, None)


def _units_per_token(rates: Rates) -> tuple[int, ...]:
    """The price of one token in units of QUANTUM (1e-10 USD), when each rate is a whole number of them
    (any price per 1M tokens with at most 4 decimals); () sends the cost through Decimal arithmetic."""
    units = [rate * _PER_TOKEN_UNITS for rate in rates.per_token()]
    if any(unit != unit.to_integral_value() for unit in units):
        return ()
    return tuple(int(unit) for unit in units)


def _text_cost(units: tuple[int, ...], prompt: int, cached: int, completion: int) -> int:
    """The cost of a text-only call in units of QUANTUM, without building TokenCounts (the same clamps):
    this runs on every request."""
    prompt = prompt if prompt > 0 else 0
    cached = cached if cached > 0 else 0
    if cached > prompt:
        cached = prompt
    completion = completion if completion > 0 else 0
    return (prompt - cached) * units[0] + cached * units[1] + completion * units[2]


def _cost_units(rates: Rates, units: tuple[int, ...], counts: TokenCounts) -> int:
    if units:
        # Integer arithmetic in units of QUANTUM: exact, and about 10x cheaper than Decimal's.
        t, c, o, ai, ao, ii, io = counts
        return (
            t * units[0]
            + c * units[1]
            + o * units[2]
            + ai * units[3]
            + ao * units[4]
            + ii * units[5]
            + io * units[6]
        )
    per_1m = Decimal(0)
    for count, rate in zip(counts, rates.per_token(), strict=True):
        per_1m = _CTX.add(per_1m, _CTX.multiply(Decimal(count), rate))
    return int(_CTX.divide(per_1m, _PER).quantize(QUANTUM, context=_CTX).scaleb(-_QUANTUM_EXPONENT))


# A NamedTuple's own constructor is a Python-level call; tuple.__new__ makes the same object in a third
# of the time, and price() runs on every metered request.
_new_priced = tuple.__new__


class _PriceFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(alias="_source")
    as_of: str
    unit: Literal["USD per 1M tokens"]
    models: dict[str, ModelPrice]


_OVERRIDES: Final = TypeAdapter(dict[str, ModelPrice])


@functools.cache
def shipped_prices() -> _PriceFile:
    raw = importlib.resources.files("app.metering").joinpath("prices.json").read_bytes()
    # parse_float=Decimal: 0.075 must stay 0.075, not 0.07499999999999999722…
    return _PriceFile.model_validate(json.loads(raw, parse_float=Decimal))


def normalize_model(model: str) -> str:
    return model.strip().lower()


def family_of(model: str) -> str:
    """``model`` without a trailing snapshot date: ``o3-mini-2025-01-31`` -> ``o3-mini``."""
    return _SNAPSHOT_SUFFIX.sub("", normalize_model(model))


class PriceTable:
    """Shipped prices merged with operator overrides; thread-safe, one per process."""

    def __init__(
        self,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        on_unknown: UnknownModelHook | None = None,
    ) -> None:
        shipped = shipped_prices()
        self.as_of: str = shipped.as_of
        self.source: str = shipped.source
        self._prices: dict[str, ModelPrice] = {normalize_model(k): v for k, v in shipped.models.items()}
        self._versions: dict[str, str] = dict.fromkeys(self._prices, shipped.as_of)
        for key, price in _validate_overrides(overrides).items():
            name = normalize_model(key)
            self._prices[name] = price
            self._versions[name] = override_version(price)
        self._on_unknown = on_unknown
        self._resolved: dict[str, tuple[str, ModelPrice] | None] = {}
        self._tiered: dict[tuple[str | None, str], _TierHit | None] = {}
        self._warned: set[str] = set()
        self._warn_lock = threading.Lock()

    def resolve(self, model: str) -> str | None:
        """The table entry ``model`` is priced by, or None when it has none."""
        hit = self._resolve(model)
        return None if hit is None else hit[0]

    def price_for(self, model: str) -> ModelPrice | None:
        hit = self._resolve(model)
        return None if hit is None else hit[1]

    def version(self, entry: str) -> str:
        return self._versions[entry]

    def entries(self) -> list[tuple[str, ModelPrice, str]]:
        """Every entry with its version, by name."""
        return [(name, self._prices[name], self._versions[name]) for name in sorted(self._prices)]

    def cost_usd(
        self,
        model: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
        *,
        audio_prompt: int = 0,
        image_prompt: int = 0,
    ) -> Decimal | None:
        """USD cost of one call at the standard tier, quantized to 1e-10; None when the model has no
        price.

        ``cached_tokens`` is the part of ``prompt_tokens`` served from the prompt cache
        (``prompt_tokens_details.cached_tokens``), ``audio_prompt`` and ``image_prompt`` the parts that are
        audio and images; ``completion_tokens`` already includes reasoning tokens.
        """
        units = self.price(
            model,
            "standard",
            prompt_tokens,
            completion_tokens,
            cached_tokens,
            audio_prompt=audio_prompt,
            image_prompt=image_prompt,
        ).cost_units
        return None if units is None else Decimal(units).scaleb(_QUANTUM_EXPONENT, context=_CTX)

    def cost_units(
        self,
        model: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
    ) -> int | None:
        """cost_usd() in units of QUANTUM (1e-10 USD), as usage events carry it."""
        return self.price(model, "standard", prompt_tokens, completion_tokens, cached_tokens).cost_units

    def price(
        self,
        model: str | None,
        tier: str,
        prompt: int,
        completion: int,
        cached: int = 0,
        audio_prompt: int = 0,
        audio_completion: int = 0,
        image_prompt: int = 0,
        image_completion: int = 0,
    ) -> Priced:
        """The cost of one call at the rates of `tier` (see rate_tier), and the entry that priced it. The
        tokens as the usage object reports them: totals, and the subsets of each (TokenCounts.split)."""
        if not isinstance(model, str) or not model:
            return _UNPRICED
        # Every metered call comes here: a model priced before goes straight to its rates, without
        # resolving its name again.
        key = (model, tier)
        try:
            hit = self._tiered[key]
        except KeyError:
            hit = self._tier_hit(model, tier)
            # Bounded like the resolutions: model names come from clients.
            if len(self._tiered) < _MAX_RESOLVED:
                self._tiered[key] = hit
        if hit is None:
            if self._resolve(model) is None:
                self._report_unknown(model)
            else:
                # A known model without rates for this tier (priority, mostly): warned, not counted as
                # an unknown model.
                self._warn(f"{model}@{tier}")
            return _UNPRICED
        units = hit.units
        if units and not (audio_prompt or audio_completion or image_prompt or image_completion):
            cost = _text_cost(units, prompt, cached, completion)
        else:
            counts = TokenCounts.split(
                prompt, completion, cached, audio_prompt, audio_completion, image_prompt, image_completion
            )
            cost = _cost_units(hit.rates, units, counts)
        return _new_priced(Priced, (cost, hit.price_key, hit.version))

    def price_usage(self, model: str | None, tier: str, usage: UsageCounts) -> Priced:
        """price() of a call's usage object. Every metered call comes here, and nearly all are text only
        and of a model priced before: those are priced straight from the rates found then, without
        unpacking the counts they do not have."""
        hit = self._tiered.get((model, tier))
        if (
            hit is not None
            and hit.units
            and not (
                usage.audio_prompt_tokens
                or usage.audio_completion_tokens
                or usage.image_prompt_tokens
                or usage.image_completion_tokens
            )
        ):
            cost = _text_cost(hit.units, usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)
            return _new_priced(Priced, (cost, hit.price_key, hit.version))
        return self.price(
            model,
            tier,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_tokens,
            usage.audio_prompt_tokens,
            usage.audio_completion_tokens,
            usage.image_prompt_tokens,
            usage.image_completion_tokens,
        )

    def lookup(self, model: str | None, tier: str) -> tuple[str, str] | None:
        """(price_key, price_version) a call of `model` at `tier` is priced by now; None: no price."""
        if not model:
            return None
        hit = self._tier_hit(model, tier)
        return None if hit is None else (hit.price_key, hit.version)

    def _tier_hit(self, model: str, tier: str) -> _TierHit | None:
        found = self._resolve(model)
        if found is None:
            return None
        name, price = found
        rates = price.rates_for(tier)
        if rates is None:
            return None
        return _TierHit(rates, _units_per_token(rates), f"{name}@{tier}", self._versions[name])

    def _resolve(self, model: str) -> tuple[str, ModelPrice] | None:
        try:
            return self._resolved[model]
        except KeyError:
            pass
        name = normalize_model(model)
        hit: tuple[str, ModelPrice] | None = None
        for candidate in (name, family_of(name)):
            price = self._prices.get(candidate)
            if price is not None:
                hit = (candidate, price)
                break
        if len(self._resolved) < _MAX_RESOLVED:
            self._resolved[model] = hit
        return hit

    def _report_unknown(self, model: str) -> None:
        if self._on_unknown is not None:
            try:
                self._on_unknown(model)
            except Exception:
                # A broken metrics hook must not cost us the usage row being recorded.
                logger.exception("on_unknown hook failed for model %r", model)
        self._warn(model)

    def _warn(self, model: str) -> None:
        if model in self._warned:
            return
        with self._warn_lock:
            if model in self._warned or len(self._warned) >= _MAX_WARNED:
                return
            self._warned.add(model)
        logger.warning(
            "no price for model %r: usage is recorded without cost (add it to `prices` in GATEWAY_CONFIG)",
            model,
        )


class _TierHit(NamedTuple):
    rates: Rates
    units: tuple[int, ...]
    price_key: str
    version: str


def override_version(price: ModelPrice) -> str:
    """An operator's entry is versioned by its content: changing its rates changes its version."""
    canonical = json.dumps(price.model_dump(mode="json", exclude_none=True), sort_keys=True)
    return "config:" + hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _validate_overrides(overrides: Mapping[str, Mapping[str, Any]] | None) -> dict[str, ModelPrice]:
    if overrides is None:
        return {}
    try:
        # Validated as given, not via dict(): a YAML list or scalar must get a message, not a TypeError.
        return _OVERRIDES.validate_python(overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']} (got {error['input']!r})"
            for error in exc.errors()
        )
        raise ValueError(f"invalid price overrides: {problems}") from exc
