"""The optional YAML file named by GATEWAY_CONFIG, validated at start-up with a one-line reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from app.config import ConfigError
from app.metering.pricing import PriceTable


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # USD per 1M tokens, per model: {input_per_1m, cached_input_per_1m?, output_per_1m}; replaces the
    # shipped entry of that model.
    prices: dict[str, dict[str, Any]] = {}


def load_config_file(path: Path | None) -> GatewayConfig:
    if path is None:
        return GatewayConfig()
    where = f"GATEWAY_CONFIG ({path})"
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
        loc = ".".join(str(part) for part in err["loc"]) or "top level"
        raise ConfigError(f"{where}: {loc}: {err['msg']}") from None
    try:
        PriceTable(config.prices)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return config
