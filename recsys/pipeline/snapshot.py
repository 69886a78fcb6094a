"""The serving snapshot: one immutable value holding everything a request reads.

Each stage reads only its part (its module states which as a Protocol; this class satisfies them
all). A change on the control plane or a new artifact version produces a new snapshot, which
the server swaps in by reference; requests already running keep the one they started on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from recsys.experiments.assignment import Assigner
from recsys.monitoring.baseline import BaselineSet
from recsys.ranking.feature_store import UserStore
from recsys.ranking.features import FeatureTables
from recsys.ranking.model import RankingModel
from recsys.ranking.routing import RoutingTable
from recsys.retrieval.availability import Availability
from recsys.retrieval.index import ItemIndex
from recsys.retrieval.retriever import Retriever
from recsys.types import ServingVersions
from recsys.version import code_version
from recsys.world import Catalogue


@dataclass(frozen=True)
class ControlDocument:
    """One control document as compiled: its store version and its body."""

    version: int
    body: Mapping[str, Any]


def snapshot_id(manifest: Mapping[str, Any]) -> str:
    """16 hex digits of the sha256 over the manifest's canonical JSON."""
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ServingSnapshot:
    catalogue: Catalogue
    tables: FeatureTables
    index: ItemIndex
    retriever: Retriever
    models: Mapping[str, RankingModel]
    """Loaded model versions by version id (every routed version, plus the previous production)."""
    routing: RoutingTable
    assigner: Assigner
    availability: Availability
    centre: tuple[float, float]
    """Metro centre (lat, lon): where a request with neither location nor known user is placed."""
    features_version: str
    user_store: UserStore | None = None
    """Where user feature rows are served from (an online store); None: the local tables."""
    pins: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """Model name -> versions pinned by the arms of the serving experiments document (they stay
    loaded whatever the routing says)."""
    documents: Mapping[str, ControlDocument] = field(default_factory=dict)
    """The control documents compiled into this snapshot, by name."""
    world_version: str = ""
    baselines: BaselineSet = field(default_factory=lambda: BaselineSet({}))
    """Training baselines of the loaded model versions, compiled and stacked for the monitor
    stage (:meth:`~recsys.monitoring.baseline.BaselineCache.for_models`)."""
    snapshot_id: str = ""
    """Content hash of :meth:`manifest` (set by the compiler once the snapshot is complete)."""

    def manifest(self) -> dict[str, Any]:
        """Everything the answers of this snapshot depended on, enough to rebuild it: the
        control documents (version and body), the index, features and world versions, every
        loaded model version, and the code version."""
        return {
            "documents": {
                name: {"version": doc.version, "body": doc.body}
                for name, doc in sorted(self.documents.items())
            },
            "index_version": self.index.version,
            "features_version": self.features_version,
            "world_version": self.world_version,
            "models": {version: model.name for version, model in sorted(self.models.items())},
            "code_version": code_version(),
        }

    def versions(self) -> ServingVersions:
        return ServingVersions(
            index_version=self.index.version,
            config_version=self.assigner.version,
            model_versions={name: r.production for name, r in self.routing.models.items()},
        )
