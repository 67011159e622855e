"""Model prices (USD per 1M tokens) and the cost of one call.

The shipped table (``prices.json``) is OpenAI's standard tier; an operator's overrides replace whole
entries, so an override never inherits a cached rate it did not state.

Resolution is deliberately narrow: the exact name, else the name without a trailing snapshot date
(``-YYYY-MM-DD`` or ``-MMDD``), so ``gpt-4o-mini-2024-07-18`` is ``gpt-4o-mini`` and never ``gpt-4o``.
There is no prefix guessing: ``gpt-4o-realtime-preview`` or ``ft:gpt-4o-mini:…`` are priced differently
from their base model, and an unknown model (warned once, counted by ``on_unknown``) is better than a
silently wrong cost.

Cached input tokens are a subset of the prompt tokens and reasoning tokens a subset of the completion
tokens, as OpenAI's usage object reports them, so neither is ever added on top.
"""

from __future__ import annotations

import decimal
import functools
import importlib.resources
import json
import logging
import re
import threading
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, Final, Literal

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


class ModelPrice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_1m: Decimal = Field(ge=0)
    cached_input_per_1m: Decimal | None = Field(default=None, ge=0)
    output_per_1m: Decimal = Field(ge=0)

    @property
    def cached_rate_per_1m(self) -> Decimal:
        # Models without prompt caching never report cached tokens; if one does, it paid full price.
        return self.input_per_1m if self.cached_input_per_1m is None else self.cached_input_per_1m


def _units_per_token(price: ModelPrice) -> tuple[int, ...]:
    """The price of one token in units of QUANTUM (1e-10 USD), when each rate is a whole number of them
    (any price per 1M tokens with at most 4 decimals); () sends the cost through Decimal arithmetic."""
    rates = (price.input_per_1m, price.cached_rate_per_1m, price.output_per_1m)
    units = [rate * _PER_TOKEN_UNITS for rate in rates]
    if any(unit != unit.to_integral_value() for unit in units):
        return ()
    return tuple(int(unit) for unit in units)


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
        self._prices: dict[str, ModelPrice] = {normalize_model(k): v for k, v in shipped.models.items()}
        self._prices.update({normalize_model(k): v for k, v in _validate_overrides(overrides).items()})
        self._on_unknown = on_unknown
        self._resolved: dict[str, tuple[str, ModelPrice] | None] = {}
        self._units: dict[str, tuple[int, ...]] = {}
        self._warned: set[str] = set()
        self._warn_lock = threading.Lock()

    def resolve(self, model: str) -> str | None:
        """The table entry ``model`` is priced by, or None when it has none."""
        hit = self._resolve(model)
        return None if hit is None else hit[0]

    def price_for(self, model: str) -> ModelPrice | None:
        hit = self._resolve(model)
        return None if hit is None else hit[1]

    def cost_usd(
        self,
        model: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
    ) -> Decimal | None:
        """USD cost of one call, quantized to 1e-10; None when the model has no price.

        ``cached_tokens`` is the part of ``prompt_tokens`` served from the prompt cache
        (``prompt_tokens_details.cached_tokens``); ``completion_tokens`` already includes reasoning tokens.
        """
        units = self.cost_units(model, prompt_tokens, completion_tokens, cached_tokens)
        return None if units is None else Decimal(units).scaleb(_QUANTUM_EXPONENT, context=_CTX)

    def cost_units(
        self,
        model: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
    ) -> int | None:
        """cost_usd() in units of QUANTUM (1e-10 USD), as usage events carry it."""
        if not isinstance(model, str) or not model:
            return None
        # Every metered call comes here: a model priced before goes straight to its rates, without
        # resolving its name again (0.47 -> 0.17 us a call in a micro-benchmark).
        units = self._units.get(model)
        if units is None:
            hit = self._resolve(model)
            if hit is None:
                self._report_unknown(model)
                return None
            units = _units_per_token(hit[1])
            # Bounded like the resolutions: model names come from clients.
            if len(self._units) < _MAX_RESOLVED:
                self._units[model] = units
        prompt = prompt_tokens if prompt_tokens > 0 else 0
        # An upstream reporting more cached than prompt tokens is wrong; never bill more than the prompt.
        cached = cached_tokens if cached_tokens > 0 else 0
        if cached > prompt:
            cached = prompt
        completion = completion_tokens if completion_tokens > 0 else 0
        if units:
            # Integer arithmetic in units of QUANTUM: exact, and about 10x cheaper than Decimal's.
            return (prompt - cached) * units[0] + cached * units[1] + completion * units[2]
        price = self.price_for(model)
        assert price is not None, "a model with rates has a price"
        per_1m = _CTX.add(
            _CTX.add(
                _CTX.multiply(Decimal(prompt - cached), price.input_per_1m),
                _CTX.multiply(Decimal(cached), price.cached_rate_per_1m),
            ),
            _CTX.multiply(Decimal(completion), price.output_per_1m),
        )
        return int(_CTX.divide(per_1m, _PER).quantize(QUANTUM, context=_CTX).scaleb(-_QUANTUM_EXPONENT))

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
