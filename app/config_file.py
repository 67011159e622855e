"""The optional YAML file named by GATEWAY_CONFIG, validated at start-up (and on SIGHUP) with a one-line
reason. Example:

    upstreams:                      # optional; "openai" (OPENAI_BASE_URL / OPENAI_API_KEY) always exists
      vllm: {base_url: "http://vllm:8000/v1", api_key_env: VLLM_API_KEY}
      azure: {base_url: "https://my-resource.openai.azure.com/openai/v1", api_key_env: AZURE_OPENAI_API_KEY,
              auth: api-key, api_version: preview}
    models:                         # which upstreams serve a model name, with weights
      llama-3.1-70b: {upstreams: [{upstream: vllm}]}
      gpt-4o-mini: {upstreams: [{upstream: openai, weight: 3}, {upstream: vllm, weight: 1}]}
    aliases: {fast: gpt-4o-mini, smart: gpt-4.1}
    fallbacks: {gpt-4.1: [gpt-4o, gpt-4o-mini]}
    features:
      support-bot: {default_model: fast, allowed_models: [fast, gpt-4o], rpm: 600, tpm: 200000,
                    budget_daily_usd: 50, max_prompt_tokens: 8000, prompt_overflow: truncate}
    users: {rpm: 20, budget_daily_usd: 1}
    limits: {fail_open: true, default_max_output_tokens: 4096,
             default_max_output_tokens_by_model: {gpt-4.1: 32768}}
    prices:
      llama-3.1-70b: {input_per_1m: 0.6, output_per_1m: 0.6}
"""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.config import ConfigError

DEFAULT_UPSTREAM = "openai"
# How an upstream is given its key (app/proxy/upstream_auth.py): `Authorization: Bearer <key>` (OpenAI
# and most others), or an `api-key: <key>` header (Azure OpenAI).
AuthStyle = Literal["bearer", "api-key"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UpstreamConfig(_Strict):
    base_url: str
    # The key is read from this environment variable, so the file holds no secret.
    api_key_env: str | None = None
    auth: AuthStyle = "bearer"
    # Sent as the `api-version` query parameter of every request to this upstream. A plain token, so it
    # needs no escaping and cannot smuggle in a parameter of its own.
    api_version: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,64}$")

    @field_validator("base_url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        if "?" in value or "#" in value:
            # The request's path is appended to it: a query here would end up in the middle of the URL.
            raise ValueError("must not hold a query or a fragment (an api-version goes in api_version)")
        return value.rstrip("/")

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class WeightedUpstream(_Strict):
    upstream: str
    weight: float = Field(default=1.0, gt=0)


class ModelRoute(_Strict):
    upstreams: list[WeightedUpstream] = Field(min_length=1)


class Caps(_Strict):
    """Rate limits and spend caps for one scope; None means no cap."""

    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    budget_daily_usd: Decimal | None = Field(default=None, ge=0)
    budget_monthly_usd: Decimal | None = Field(default=None, ge=0)


class FeatureConfig(Caps):
    default_model: str | None = None
    # None: any model; a list: only these (aliases allowed, resolved like the request's model).
    allowed_models: list[str] | None = None
    # The largest chat prompt the feature may send, and what to do with a larger one.
    max_prompt_tokens: int | None = Field(default=None, ge=1)
    prompt_overflow: Literal["reject", "truncate"] = "reject"
    # Output tokens a budget reserves for a call of this feature that sets no output cap of its own.
    default_max_output_tokens: int | None = Field(default=None, ge=1)


class LimitsConfig(_Strict):
    # When Redis (GATEWAY_REDIS_URL) cannot be reached: admit and count a metric (open), or refuse (closed).
    fail_open: bool = True
    redis_timeout_s: float = Field(default=0.25, gt=0, le=5)
    # Output tokens a budget reserves for a call that sets no output cap (max_tokens,
    # max_completion_tokens, max_output_tokens), unless its feature or its model names another number.
    default_max_output_tokens: int = Field(default=4096, ge=1)
    default_max_output_tokens_by_model: dict[str, Annotated[int, Field(ge=1)]] = {}


class GatewayConfig(_Strict):
    upstreams: dict[str, UpstreamConfig] = {}
    models: dict[str, ModelRoute] = {}
    aliases: dict[str, str] = {}
    fallbacks: dict[str, list[str]] = {}
    features: dict[str, FeatureConfig] = {}
    # Caps that apply to every end user (X-User-Id) separately.
    users: Caps = Caps()
    limits: LimitsConfig = LimitsConfig()
    # USD per 1M tokens, per model: {input_per_1m, cached_input_per_1m?, output_per_1m}; replaces the
    # shipped entry of that model.
    prices: dict[str, dict[str, Any]] = {}

    @model_validator(mode="after")
    def _references(self) -> GatewayConfig:
        known = {DEFAULT_UPSTREAM, *self.upstreams}
        for model, route in self.models.items():
            for entry in route.upstreams:
                if entry.upstream not in known:
                    raise ValueError(f"models.{model}: unknown upstream {entry.upstream!r}")
        for alias, target in self.aliases.items():
            if target in self.aliases:
                raise ValueError(f"aliases.{alias}: points at another alias ({target!r}); name a model")
        return self


def load_config_file(path: Path | None) -> GatewayConfig:
    """The file read and validated, all but the rates of its `prices`, which the price table validates
    (`app.live_config.load_gateway_config` checks both)."""
    if path is None:
        return GatewayConfig()
    where = source(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML{line}") from None
    try:
        config = GatewayConfig.model_validate(raw or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(part) for part in err["loc"])
        message = str(err["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{where}: {loc + ': ' if loc else ''}{message}") from None
    return config


def source(path: Path | None) -> str:
    """The file as an error about it names it."""
    return f"GATEWAY_CONFIG ({path})"
