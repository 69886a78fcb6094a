"""The routing table: which model version scores a request.

A control-plane document (name ``routing``)::

    {"index": "<index version>",
     "models": {"ranker": {"production": "<version>",
                           "canary": {"version": "<version>", "percent": 5.0},
                           "previous": "<version>"}}}

Canary traffic is chosen by a salted hash of the user id (deterministic: a user stays on the
canary while it runs), never at random per request. A version pinned by an experiment arm
(``PipelineParams.model_version`` in the experiments document, where the arm is defined) wins
over both; :func:`arm_pins` reads those pins so servers load them and the registry refuses to
retire them. ``previous`` is the production version before the last promotion: it serves no
traffic but stays loaded, so a rollback is a pointer flip.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

CANARY_BUCKETS = 10_000
DEFAULT_MODEL_NAME = "ranker"


class RoutingError(ValueError):
    """The routing document is invalid; the message names the field."""


@dataclass(frozen=True)
class ModelRoute:
    production: str
    canary: str = ""
    canary_percent: float = 0.0
    previous: str = ""

    def versions(self) -> set[str]:
        """Versions that take traffic: production and the canary."""
        return {v for v in (self.production, self.canary) if v}

    def loaded_versions(self) -> set[str]:
        """Versions a server keeps loaded: the routed ones and the previous production."""
        return self.versions() | ({self.previous} if self.previous else set())

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"production": self.production}
        if self.canary:
            doc["canary"] = {"version": self.canary, "percent": self.canary_percent}
        if self.previous:
            doc["previous"] = self.previous
        return doc


@dataclass(frozen=True)
class RoutingTable:
    index_version: str
    models: Mapping[str, ModelRoute]

    def resolve(self, name: str, user_id: str, pinned: str = "") -> str:
        if pinned:
            return pinned
        route = self.models.get(name)
        if route is None:
            raise RoutingError(f"models.{name}: no route for this model name")
        if route.canary and canary_bucket(name, route.canary, user_id) < route.canary_percent * 100:
            return route.canary
        return route.production

    def routed_versions(self) -> dict[str, set[str]]:
        return {name: route.versions() for name, route in self.models.items()}

    def loaded_versions(self) -> dict[str, set[str]]:
        return {name: route.loaded_versions() for name, route in self.models.items()}

    def to_document(self) -> dict[str, Any]:
        return {
            "index": self.index_version,
            "models": {name: route.to_document() for name, route in self.models.items()},
        }


def arm_pins(experiments: Mapping[str, Any]) -> dict[str, dict[str, set[str]]]:
    """Model versions pinned by experiment arms: ``{model name: {version: {"exp/arm", ...}}}``.

    Reads the experiments document body leniently (the experiments config validates it); the
    model name is the arm's ``model_name`` parameter, else the layer's or the defaults', else
    ``ranker``.
    """
    pins: dict[str, dict[str, set[str]]] = {}
    defaults = experiments.get("defaults")
    default_name = _param(defaults, "model_name") or DEFAULT_MODEL_NAME

    def add(params: Any, label: str, fallback_name: str) -> None:
        version = _param(params, "model_version")
        if version:
            name = _param(params, "model_name") or fallback_name
            pins.setdefault(name, {}).setdefault(version, set()).add(label)

    add(defaults, "defaults", default_name)
    for layer in _objects(experiments.get("layers")):
        launch = layer.get("launch_defaults")
        layer_name = _param(launch, "model_name") or default_name
        add(launch, f"{layer.get('name', '?')}/launch_defaults", default_name)
        for experiment in _objects(layer.get("experiments")):
            for arm in _objects(experiment.get("arms")):
                label = f"{experiment.get('name', '?')}/{arm.get('name', '?')}"
                add(arm.get("params"), label, layer_name)
    return pins


def _objects(value: Any) -> list[Mapping[str, Any]]:
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def _param(params: Any, key: str) -> str:
    value = params.get(key) if isinstance(params, Mapping) else None
    return value if isinstance(value, str) else ""


def canary_bucket(name: str, version: str, user_id: str) -> int:
    """The user's bucket (0..9,999) for the canary ``version`` of model ``name``: fixed while that
    version is the canary, so a ramp keeps its users; salted by the version, so each canary
    draws its own users (with one draw for every canary of a model, a group of users that
    happened to order less than the rest judged every canary of it worse)."""
    digest = hashlib.sha256(f"canary:{name}:{version}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % CANARY_BUCKETS


def parse_routing(
    doc: Mapping[str, Any], *, known_versions: Mapping[str, Collection[str]] | None = None
) -> RoutingTable:
    """Validate a routing document; ``known_versions`` (name -> versions) checks references."""
    index = doc.get("index")
    if not isinstance(index, str) or not index:
        raise RoutingError("index: expected a non-empty index version string")
    models = doc.get("models")
    if not isinstance(models, Mapping) or not models:
        raise RoutingError("models: expected an object mapping model names to routes")
    routes: dict[str, ModelRoute] = {}
    for name, spec in models.items():
        where = f"models.{name}"
        if not isinstance(spec, Mapping):
            raise RoutingError(f"{where}: expected an object")
        production = spec.get("production")
        if not isinstance(production, str) or not production:
            raise RoutingError(f"{where}.production: expected a version string")
        canary, percent = "", 0.0
        if spec.get("canary") is not None:
            c = spec["canary"]
            if not isinstance(c, Mapping) or not isinstance(c.get("version"), str):
                raise RoutingError(
                    f"{where}.canary: expected {{'version': str, 'percent': number}}"
                )
            canary = c["version"]
            p = c.get("percent")
            if not isinstance(p, int | float) or isinstance(p, bool) or not 0 < p <= 100:
                raise RoutingError(f"{where}.canary.percent: expected a number in (0, 100]")
            percent = float(p)
        previous = spec.get("previous", "")
        if not isinstance(previous, str):
            raise RoutingError(f"{where}.previous: expected a version string")
        if canary and canary == production:
            raise RoutingError(f"{where}.canary: {canary} is already the production version")
        route = ModelRoute(production, canary, percent, previous)
        if known_versions is not None:
            missing = route.loaded_versions() - set(known_versions.get(name, ()))
            if missing:
                raise RoutingError(f"{where}: unknown version(s) {sorted(missing)}")
        routes[name] = route
    return RoutingTable(index_version=index, models=routes)
