"""The serving snapshot: one immutable value holding everything a request reads.

Each stage reads only its part (its module states which as a Protocol; this class satisfies them
all). A change on the control plane or a new artifact version produces a new snapshot, which
the server swaps in by reference; requests already running keep the one they started on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from recsys.experiments.assignment import Assigner
from recsys.ranking.feature_store import UserStore
from recsys.ranking.features import FeatureTables
from recsys.ranking.model import RankingModel
from recsys.ranking.routing import RoutingTable
from recsys.retrieval.availability import Availability
from recsys.retrieval.index import ItemIndex
from recsys.retrieval.retriever import Retriever
from recsys.types import ServingVersions
from recsys.world import Catalogue


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

    def versions(self) -> ServingVersions:
        return ServingVersions(
            index_version=self.index.version,
            config_version=self.assigner.version,
            model_versions={name: r.production for name, r in self.routing.models.items()},
        )
