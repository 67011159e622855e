"""The policy and prices in force: one reading of GATEWAY_CONFIG, replaced whole when the file is read again
(SIGHUP), so that no reader ever sees the policy of one reading with the prices of another."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from starlette.types import Scope

from app.config import ConfigError
from app.config_file import GatewayConfig, load_config_file, source
from app.limits.policy import Policy
from app.metering.pricing import PriceTable

# Where a request keeps the LiveConfig it was admitted under (in its ASGI scope's state), so that the
# metering at its end prices it at the rates its admission estimated with, even after a reload.
SCOPE_KEY = "gateway_config"


@dataclass(frozen=True, slots=True)
class LiveConfig:
    policy: Policy
    prices: PriceTable


class ConfigHolder:
    """The one owner of the LiveConfig in force. Readers take `current` once per piece of work (a request,
    a batch's files) and keep it: a reload only rebinds `current`, so work under way finishes with the
    reading it started with. Rebinding an attribute is atomic, so a reload from another thread is safe."""

    __slots__ = ("current",)

    def __init__(self, config: LiveConfig) -> None:
        self.current = config

    def prices_for(self, scope: Scope) -> PriceTable:
        """The prices a request was admitted under (kept in its scope's state), whatever a reload has put
        in force since; the ones in force for a request that never got that far."""
        config: LiveConfig = scope["state"].get(SCOPE_KEY) or self.current
        return config.prices


def load_gateway_config(path: Path | None) -> GatewayConfig:
    """GATEWAY_CONFIG read and validated whole, its prices too, so that a file the gateway could not
    price with is refused at start-up and on SIGHUP like any other mistake in it."""
    config = load_config_file(path)
    try:
        PriceTable(config.prices)
    except ValueError as exc:
        raise ConfigError(f"{source(path)}: {exc}") from None
    return config
