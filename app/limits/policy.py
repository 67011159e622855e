"""Model policy: aliases, per-feature defaults and allowed models, fallbacks, and which upstream serves a
model. Built from the settings and the GATEWAY_CONFIG file; replaced whole on SIGHUP, so a request keeps
the policy it started with."""

from __future__ import annotations

import random

from app.call.who import ApiKey
from app.config import Settings
from app.config_file import DEFAULT_UPSTREAM, GatewayConfig
from app.db.events import MAX_MODEL_CHARS, is_model_name
from app.errors import GatewayError, bad_request
from app.proxy.targets import Candidate, UpstreamTarget


class Policy:
    def __init__(self, settings: Settings, config: GatewayConfig) -> None:
        default = UpstreamTarget(
            DEFAULT_UPSTREAM,
            settings.openai_base_url,
            settings.openai_api_key.get_secret_value() if settings.openai_api_key else None,
        )
        self.targets = {DEFAULT_UPSTREAM: default} | {
            name: UpstreamTarget(
                name,
                upstream.base_url,
                upstream.api_key(),
                upstream.auth,
                upstream.api_version,
                configured=True,
            )
            for name, upstream in config.upstreams.items()
        }
        # An `openai` entry in GATEWAY_CONFIG replaces OPENAI_BASE_URL/OPENAI_API_KEY everywhere, not only
        # for the models routed to it by name (an Azure-only gateway sends its model list there too).
        self.default_target = self.targets[DEFAULT_UPSTREAM]
        self.aliases = dict(config.aliases)
        self._routes = {
            model: ([self.targets[e.upstream] for e in route.upstreams], [e.weight for e in route.upstreams])
            for model, route in config.models.items()
        }
        self._fallbacks = config.fallbacks
        self._features = config.features
        self.config = config

    def resolve(self, model: str) -> str:
        return self.aliases.get(model, model)

    def allowed_models(self, feature: str | None, key: ApiKey | None = None) -> set[str] | None:
        """The models a call may use (aliases resolved): what its feature and its key both allow, or None
        when neither restricts."""
        rules = self._features.get(feature) if feature is not None else None
        allowed: set[str] | None = None
        if rules is not None and rules.allowed_models is not None:
            allowed = {self.resolve(model) for model in rules.allowed_models}
        if key is not None and key.allowed_models is not None:
            by_key = {self.resolve(model) for model in key.allowed_models}
            allowed = by_key if allowed is None else allowed & by_key
        return allowed

    def requested_model(self, model: object, feature: str | None) -> str:
        """The body's `model`, or the feature's default when the body names none."""
        if model is None:
            rules = self._features.get(feature) if feature is not None else None
            if rules is not None and rules.default_model is not None:
                return rules.default_model
            raise bad_request(
                "Missing required parameter: 'model'.", param="model", code="missing_required_parameter"
            )
        if not isinstance(model, str) or not model:
            raise bad_request("Invalid type for 'model': expected a non-empty string.", param="model")
        if not is_model_name(model):
            raise bad_request(
                f"Invalid 'model': expected at most {MAX_MODEL_CHARS} printable characters.", param="model"
            )
        return model

    def candidates(self, requested: str, feature: str | None, key: ApiKey | None = None) -> list[Candidate]:
        model = self.resolve(requested)
        if (
            key is not None
            and key.allowed_models is not None
            and model not in set(map(self.resolve, key.allowed_models))
        ):
            raise GatewayError(
                403, f"This key may not use model '{requested}'.", param="model", code="model_not_allowed"
            )
        allowed = self.allowed_models(feature, key)
        if allowed is not None and model not in allowed:
            raise GatewayError(
                403,
                f"Feature '{feature}' may not use model '{requested}'.",
                param="model",
                code="model_not_allowed",
            )
        chain = [model]
        for fallback in self._fallbacks.get(requested, self._fallbacks.get(model, [])):
            resolved = self.resolve(fallback)
            # A fallback the feature may not use is skipped, not an error: the request itself was allowed.
            if resolved not in chain and (allowed is None or resolved in allowed):
                chain.append(resolved)
        return [Candidate(name, self.target_for(name)) for name in chain]

    def target_for(self, model: str) -> UpstreamTarget:
        route = self._routes.get(model)
        if route is None:
            return self.default_target
        targets, weights = route
        return targets[0] if len(targets) == 1 else random.choices(targets, weights)[0]
