"""The serving state: one immutable snapshot of everything a request reads.

Artifacts (catalogue, feature tables, index, models) are loaded, validated and warmed here, off
the event loop; control-plane documents (experiments, routing, availability) are compiled into
the snapshot. A change produces a new snapshot that the pipeline swaps in by reference; a
document or artifact that fails validation raises and the previous snapshot keeps serving.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from experiments.assignment import Assigner, compile_config
from ranking.features import FeatureTables, load_feature_tables
from ranking.model import RankingModel, load_model
from ranking.routing import RoutingTable, parse_routing
from recsys.artifacts import ArtifactError, ArtifactRoot, read_manifest, versions
from recsys.types import ServingVersions
from recsys.world import Catalogue, load_world
from retrieval.availability import Availability
from retrieval.index import ItemIndex
from retrieval.retriever import Retriever

log = logging.getLogger(__name__)

EXPERIMENTS = "experiments"
ROUTING = "routing"
AVAILABILITY = "availability"
DOCUMENTS = (ROUTING, EXPERIMENTS, AVAILABILITY)


class StateError(Exception):
    """A snapshot could not be built; the message says which document or artifact and why."""


@dataclass(frozen=True)
class ServingState:
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

    def versions(self) -> ServingVersions:
        return ServingVersions(
            index_version=self.index.version,
            config_version=self.assigner.version,
            model_versions={name: r.production for name, r in self.routing.models.items()},
        )


class StateLoader:
    """Builds snapshots from the artifact root, caching what is immutable (artifact versions)."""

    def __init__(self, root: ArtifactRoot) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._models: dict[tuple[str, str], RankingModel] = {}

    def model(self, name: str, version: str) -> RankingModel:
        with self._lock:
            cached = self._models.get((name, version))
        if cached is not None:
            return cached
        directory = self.root.models(name) / version
        if not directory.is_dir():
            raise StateError(f"model {name}/{version}: not in the registry ({directory})")
        model = load_model(directory)
        with self._lock:
            self._models[(name, version)] = model
        return model

    def known_model_versions(self) -> dict[str, list[str]]:
        parent = self.root.path / "models"
        if not parent.is_dir():
            return {}
        return {p.name: versions(p) for p in sorted(parent.iterdir()) if p.is_dir()}

    def initial(self, docs: Mapping[str, Mapping[str, Any]], config_version: str) -> ServingState:
        """Load everything named by the routing document and compile the other documents."""
        missing = [name for name in DOCUMENTS if name not in docs]
        if missing:
            raise StateError(f"control plane has no {', '.join(missing)} document")
        routing = self._routing(docs[ROUTING])
        index_dir = self.root.indexes / routing.index_version
        try:
            index_manifest = read_manifest(index_dir)
            features_dir = self.root.features / str(index_manifest["features_version"])
            features_manifest = read_manifest(features_dir)
            world_dir = self.root.world / str(features_manifest["world_version"])
            world = load_world(world_dir)
        except (ArtifactError, KeyError, FileNotFoundError) as e:
            raise StateError(
                f"index {routing.index_version}: cannot resolve its inputs: {e}"
            ) from e
        catalogue = world.catalogue
        tables = load_feature_tables(features_dir, catalogue)
        index = ItemIndex.load(
            index_dir,
            expected_dimension=int(tables.item_vectors.shape[1]),
            expected_count=catalogue.n_items,
        )
        models = self._models_for(routing)
        availability = Availability.from_document(catalogue, docs[AVAILABILITY])
        retriever = Retriever(
            index, tables.user_vectors, catalogue, tables.item_popularity, availability
        )
        return ServingState(
            catalogue=catalogue,
            tables=tables,
            index=index,
            retriever=retriever,
            models=models,
            routing=routing,
            assigner=self._assigner(docs[EXPERIMENTS], config_version),
            availability=availability,
            centre=(world.meta.center_lat, world.meta.center_lon),
        )

    def with_experiments(
        self, state: ServingState, doc: Mapping[str, Any], version: str
    ) -> ServingState:
        return replace(state, assigner=self._assigner(doc, version))

    def with_availability(self, state: ServingState, doc: Mapping[str, Any]) -> ServingState:
        availability = Availability.from_document(state.catalogue, doc)
        return replace(
            state,
            availability=availability,
            retriever=state.retriever.with_availability(availability),
        )

    def with_routing(self, state: ServingState, doc: Mapping[str, Any]) -> ServingState:
        routing = self._routing(doc)
        state = self._with_index(state, routing.index_version)
        return self._with_models(state, routing)

    def _with_index(self, state: ServingState, index_version: str) -> ServingState:
        """The snapshot serving ``index_version`` (unchanged when it already does)."""
        if index_version == state.index.version:
            return state
        raise StateError(
            f"routing.index: {index_version} differs from the serving index "
            f"{state.index.version}; index swaps need a restart in this version"
        )

    def _with_models(self, state: ServingState, routing: RoutingTable) -> ServingState:
        models = self._models_for(routing)
        # Keep what served until now loaded, so a rollback is a pointer flip.
        merged = {**state.models, **models}
        return replace(state, routing=routing, models=merged)

    def _routing(self, doc: Mapping[str, Any]) -> RoutingTable:
        return parse_routing(doc, known_versions=self.known_model_versions())

    def _models_for(self, routing: RoutingTable) -> dict[str, RankingModel]:
        return {
            version: self.model(name, version)
            for name, route_versions in routing.routed_versions().items()
            for version in sorted(route_versions)
        }

    def _assigner(self, doc: Mapping[str, Any], version: str) -> Assigner:
        known = {v for vs in self.known_model_versions().values() for v in vs}
        return compile_config(doc, version=version, known_model_versions=known)


def artifact_root(path: Path) -> ArtifactRoot:
    if not path.is_dir():
        raise StateError(f"--artifacts {path}: no such directory; run `recsys build --out {path}`")
    return ArtifactRoot(path)
