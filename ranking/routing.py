"""The routing table: which model version scores a request.

A control-plane document (name ``routing``)::

    {"index": "<index version>",
     "models": {"ranker": {"production": "<version>",
                           "canary": {"version": "<version>", "percent": 5.0}}}}

Canary traffic is chosen by a salted hash of the user id (deterministic: a user stays on the
canary while it runs), never at random per request. A version pinned by an experiment arm
(``PipelineParams.model_version``) wins over both.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

CANARY_BUCKETS = 10_000


class RoutingError(ValueError):
    """The routing document is invalid; the message names the field."""


@dataclass(frozen=True)
class ModelRoute:
    production: str
    canary: str = ""
    canary_percent: float = 0.0

    def versions(self) -> set[str]:
        return {v for v in (self.production, self.canary) if v}


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
        if route.canary and canary_bucket(name, user_id) < route.canary_percent * 100:
            return route.canary
        return route.production

    def routed_versions(self) -> dict[str, set[str]]:
        return {name: route.versions() for name, route in self.models.items()}


def canary_bucket(name: str, user_id: str) -> int:
    digest = hashlib.sha256(f"canary:{name}:{user_id}".encode()).digest()
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
        route = ModelRoute(production, canary, percent)
        if known_versions is not None:
            missing = route.versions() - set(known_versions.get(name, ()))
            if missing:
                raise RoutingError(f"{where}: unknown version(s) {sorted(missing)}")
        routes[name] = route
    return RoutingTable(index_version=index, models=routes)
