"""Bounded label values for /metrics.

Clients choose `X-Feature`, the body's `model` and the passthrough's path, and a Prometheus series for
every value they invent grows each scrape without end: 20,000 made-up features took /metrics from 55 KB
to 8.5 MB and a scrape to 480 ms of the event loop. So a value is a label of its own only when the
gateway knows it — a feature named in GATEWAY_CONFIG, a model the price table or GATEWAY_CONFIG knows, a
route of the app — or it is among the first few others seen (GATEWAY_METRICS_MAX_FEATURES features, 100
passthrough endpoints); the rest count under `other`. The usage rows keep every value as it came.

Once a value has been seen, its label is one dict lookup. The metrics are updated on the event loop's
thread only, so the tables need no lock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from app.config_file import GatewayConfig
from app.metering.pricing import PriceTable

OTHER = "other"
# Passthrough endpoints with a label of their own besides the app's routes.
_MAX_OTHER_ROUTES = 100
# Names remembered with their label (model names here, a call's three names in the usage metrics); beyond
# that a name is looked up again (the price table's own cache is bounded likewise).
MAX_NAMES_REMEMBERED = 4096


def _no_price(_: str) -> str | None:
    return None


class _FirstSeen:
    """Names given up front, plus the first `spare` others seen."""

    def __init__(self, spare: int) -> None:
        # The empty name (no feature) is always a label: it is how a call without one is counted.
        self.labels: dict[str, str] = {"": ""}
        self.spare = spare

    def name(self, names: Iterable[str]) -> None:
        self.labels.update((name, name) for name in names)

    def __call__(self, value: str) -> str:
        label = self.labels.get(value)
        if label is not None:
            return label
        if self.spare <= 0:
            return OTHER
        self.spare -= 1
        self.labels[value] = value
        return value


class MetricLabels:
    def __init__(self, max_features: int) -> None:
        self.feature = _FirstSeen(max_features)
        self.route = _FirstSeen(_MAX_OTHER_ROUTES)
        self._models: dict[str, str] = {"": ""}
        self._configured_models: frozenset[str] = frozenset()
        self._price_entry: Callable[[str], str | None] = _no_price

    def name_routes(self, routes: Iterable[str]) -> None:
        self.route.name(routes)

    def configure(self, config: GatewayConfig, prices: PriceTable) -> None:
        """At start-up and on SIGHUP. Features keep the labels they had: their series exist already."""
        self.feature.name(config.features)
        rules = config.features.values()
        self._configured_models = frozenset(
            {
                *config.aliases,
                *config.aliases.values(),
                *config.models,
                *config.prices,
                *config.fallbacks,
                *(model for chain in config.fallbacks.values() for model in chain),
                *(rule.default_model for rule in rules if rule.default_model is not None),
                *(model for rule in rules for model in rule.allowed_models or ()),
            }
        )
        self._price_entry = prices.resolve
        self._models = {"": ""}

    def model(self, name: str) -> str:
        """The name itself when GATEWAY_CONFIG names it, else the price table's entry it is priced by (a
        dated snapshot counts under its model), else `other`."""
        label = self._models.get(name)
        if label is None:
            label = name if name in self._configured_models else self._price_entry(name) or OTHER
            if len(self._models) < MAX_NAMES_REMEMBERED:
                self._models[name] = label
        return label

    def usage_key(self, model: str, upstream_model: str, feature: str) -> tuple[str, str, str]:
        """The labels of a call's model, answering model and feature."""
        return (self.model(model), self.model(upstream_model), self.feature(feature))
