"""The serving state: one immutable snapshot of everything a request reads.

Artifacts (catalogue, feature tables, index, models) are loaded, validated and warmed here, off
the event loop; control-plane documents (experiments, routing, availability) are compiled into
the snapshot. A change produces a new snapshot that the pipeline swaps in by reference; a
document or artifact that fails validation raises and the previous snapshot keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from recsys.artifacts import ArtifactError, ArtifactRoot, read_manifest, versions
from recsys.control.store import AVAILABILITY, DOCUMENTS, EXPERIMENTS, ROUTING
from recsys.experiments.assignment import Assigner, compile_config
from recsys.ranking.feature_store import RedisUserStore, open_user_store
from recsys.ranking.features import FeatureTables, load_feature_tables, user_feature_rows
from recsys.ranking.model import ModelValidationError, RankingModel
from recsys.ranking.registry import LATENCY_BUDGET_US_PER_ROW, load_for_serving
from recsys.ranking.routing import RoutingTable, arm_pins, parse_routing
from recsys.retrieval.availability import Availability
from recsys.retrieval.index import ItemIndex
from recsys.retrieval.retriever import RetrievalQuery, Retriever
from recsys.types import Location, ServingVersions
from recsys.world import Catalogue, World, load_world

log = logging.getLogger(__name__)

UNLOAD_GRACE_SECONDS = 30.0
"""How long a version no route or arm needs stays loaded before it is unloaded."""


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

    def __init__(
        self,
        root: ArtifactRoot,
        *,
        compile_models: bool = True,
        latency_budget_us: float = LATENCY_BUDGET_US_PER_ROW,
        unload_grace_seconds: float = UNLOAD_GRACE_SECONDS,
        on_model_rejected: Callable[[str, str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self.compile_models = compile_models
        self.latency_budget_us = latency_budget_us
        self.unload_grace_seconds = unload_grace_seconds
        self._on_model_rejected = on_model_rejected
        self._clock = clock
        self._lock = threading.Lock()
        self._models: dict[tuple[str, str], RankingModel] = {}
        self._unneeded_since: dict[str, float] = {}
        """Loaded versions no route or arm uses any more, and since when (for the grace)."""
        self._pins: dict[str, set[str]] = {}
        """Model name -> versions pinned by the arms of the serving experiments document."""

    def model(self, name: str, version: str) -> RankingModel:
        """The loaded, validated, compiled (or LightGBM fallback) and warmed version.

        Off the request path. A version that fails validation raises :class:`StateError` with
        the reason, which is also logged and counted (``on_model_rejected``); it never serves.
        """
        with self._lock:
            cached = self._models.get((name, version))
        if cached is not None:
            return cached
        directory = self.root.models(name) / version
        if not directory.is_dir():
            raise StateError(f"model {name}/{version}: not in the registry ({directory})")
        try:
            model, engine = load_for_serving(
                self.root,
                name,
                version,
                compile_models=self.compile_models,
                latency_budget_us=self.latency_budget_us,
            )
        except ModelValidationError as e:
            self._model_rejected(name, version, e)
            raise StateError(f"model {name}/{version} rejected, it will not serve: {e}") from e
        log.info("model %s/%s loaded and validated; engine %s", name, version, engine)
        with self._lock:
            self._models[(name, version)] = model
        return model

    def _model_rejected(self, name: str, version: str, error: ModelValidationError) -> None:
        log.error("model %s/%s failed validation and will not serve: %s", name, version, error)
        if self._on_model_rejected is not None:
            self._on_model_rejected(name, version, rejection_reason(str(error)))

    def loaded_model_versions(self) -> set[tuple[str, str]]:
        """(name, version) of every model the loader holds (the snapshot's and those in grace)."""
        with self._lock:
            return set(self._models)

    def known_model_versions(self) -> dict[str, list[str]]:
        parent = self.root.path / "models"
        if not parent.is_dir():
            return {}
        return {p.name: versions(p) for p in sorted(parent.iterdir()) if p.is_dir()}

    def initial(
        self,
        docs: Mapping[str, Mapping[str, Any]],
        config_version: str,
        *,
        feature_store: str = "",
        feature_store_prefix: str = "recsys:",
    ) -> ServingState:
        """Load everything named by the routing document and compile the other documents.

        ``feature_store``: where retrieval reads user vectors: "" the memory-mapped tables (the
        default, nothing in between), or redis://... the online store with the tables as the
        fallback (retrieval/feature_store.py); index swaps keep the same store.
        """
        missing = [name for name in DOCUMENTS if name not in docs]
        if missing:
            raise StateError(f"control plane has no {', '.join(missing)} document")
        routing = self._routing(docs[ROUTING])
        loaded = self.load_index(routing.index_version)
        world, tables, index = loaded.world, loaded.tables, loaded.index
        catalogue = world.catalogue
        pins = _pinned(docs[EXPERIMENTS])
        models = self._models_for(routing, pins)
        self._pins = pins
        availability = Availability.from_document(catalogue, docs[AVAILABILITY])
        user_store = None
        if feature_store:
            try:
                user_store = open_user_store(
                    feature_store,
                    prefix=feature_store_prefix,
                    features_version=loaded.features_version,
                    user_ids=tables.user_ids,
                    user_vectors=all_user_rows(tables),
                )
            except ValueError as e:
                raise StateError(f"feature store: {e}") from e
        retriever = Retriever(
            index, tables.user_vectors, catalogue, tables.item_popularity, availability, user_store
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
        assigner = self._assigner(doc, version)
        pins = _pinned(doc)
        state = self._with_models(replace(state, assigner=assigner), state.routing, pins)
        self._pins = pins
        return state

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

    def load_index(self, index_version: str) -> LoadedIndex:
        """Index version ``index_version`` with the feature tables and world it was built from:
        memory-mapped (tables, world, the index's vectors), validated (files, shapes, recall on
        the version's probe queries) and so warmed. Raises StateError naming what is wrong."""
        index_dir = self.root.indexes / index_version
        try:
            index_manifest = read_manifest(index_dir)
            features_dir = self.root.features / str(index_manifest["features_version"])
            features_manifest = read_manifest(features_dir)
            features_version = str(index_manifest["features_version"])
            world_version = str(features_manifest["world_version"])
            world = load_world(self.root.world / world_version)
            tables = load_feature_tables(features_dir, world.catalogue)
            index = ItemIndex.load(
                index_dir,
                expected_dimension=int(tables.item_vectors.shape[1]),
                expected_count=world.catalogue.n_items,
            )
        except (ArtifactError, KeyError, OSError, ValueError) as e:
            raise StateError(f"index {index_version}: cannot load it or its inputs: {e}") from e
        return LoadedIndex(world_version, features_version, world, tables, index)

    def _with_index(self, state: ServingState, index_version: str) -> ServingState:
        """The snapshot serving ``index_version`` (unchanged when it already does).

        Called off the event loop (the control follower's thread): the new version, its
        feature tables and world are loaded, validated and warmed by a real retrieval while the
        previous snapshot keeps serving; the caller then swaps the whole snapshot at once. The
        current availability switches carry over to the new catalogue.
        """
        if index_version == state.index.version:
            return state
        loaded = self.load_index(index_version)
        catalogue = loaded.world.catalogue
        try:
            availability = Availability.from_document(
                catalogue,
                {
                    "skus_off": state.availability.skus_off.tolist(),
                    "restaurants_off": state.availability.restaurants_off.tolist(),
                },
            )
            store = state.retriever.user_store
            if isinstance(store, RedisUserStore):
                store = store.for_version(
                    loaded.features_version, loaded.tables.user_ids, all_user_rows(loaded.tables)
                )
            retriever = Retriever(
                loaded.index,
                loaded.tables.user_vectors,
                catalogue,
                loaded.tables.item_popularity,
                availability,
                store,
            )
        except ValueError as e:
            raise StateError(f"routing.index {index_version}: {e}") from e
        warm_retriever(retriever, state.centre)
        return replace(
            state,
            catalogue=catalogue,
            tables=loaded.tables,
            index=loaded.index,
            retriever=retriever,
            availability=availability,
            centre=(loaded.world.meta.center_lat, loaded.world.meta.center_lon),
        )

    def _with_models(
        self,
        state: ServingState,
        routing: RoutingTable,
        pins: Mapping[str, set[str]] | None = None,
    ) -> ServingState:
        """The snapshot with ``routing``: every version it or an arm needs loaded and warmed.

        Versions no longer needed stay in the snapshot for ``unload_grace_seconds`` (a client
        retrying against a just-replaced version still finds it), then leave it and the cache;
        requests already running keep theirs through the snapshot they started on. The previous
        production is part of the route, so it stays loaded and a rollback is a pointer flip.
        """
        models = self._models_for(routing, self._pins if pins is None else pins)
        now = self._clock()
        kept: dict[str, RankingModel] = {}
        with self._lock:
            for version, model in state.models.items():
                if version in models:
                    continue
                since = self._unneeded_since.setdefault(version, now)
                if now - since < self.unload_grace_seconds:
                    kept[version] = model
            for version in models:
                self._unneeded_since.pop(version, None)
            for version in [v for v in self._unneeded_since if v not in kept]:
                del self._unneeded_since[version]
            self._models = {
                key: m for key, m in self._models.items() if key[1] in models or key[1] in kept
            }
        if kept:
            log.info("models kept for the unload grace period: %s", sorted(kept))
        return replace(state, routing=routing, models={**kept, **models})

    def unload_expired(self, state: ServingState) -> ServingState | None:
        """A snapshot without the versions whose grace has run out, or None if there are none."""
        if not self._unneeded_since:
            return None
        now = self._clock()
        with self._lock:
            expired = [
                v
                for v, since in self._unneeded_since.items()
                if now - since >= self.unload_grace_seconds
            ]
        if not expired:
            return None
        return self._with_models(state, state.routing)

    def _routing(self, doc: Mapping[str, Any]) -> RoutingTable:
        return parse_routing(doc, known_versions=self.known_model_versions())

    def _models_for(
        self, routing: RoutingTable, pins: Mapping[str, set[str]]
    ) -> dict[str, RankingModel]:
        """Production, canary, previous production, and versions pinned by experiment arms."""
        needed = routing.loaded_versions()
        for name, versions_pinned in pins.items():
            needed.setdefault(name, set()).update(versions_pinned)
        return {
            version: self.model(name, version)
            for name, route_versions in sorted(needed.items())
            for version in sorted(route_versions)
        }

    def _assigner(self, doc: Mapping[str, Any], version: str) -> Assigner:
        known = {v for vs in self.known_model_versions().values() for v in vs}
        return compile_config(doc, version=version, known_model_versions=known)


@dataclass(frozen=True)
class LoadedIndex:
    world_version: str
    features_version: str
    world: World
    tables: FeatureTables
    index: ItemIndex


def warm_retriever(retriever: Retriever, centre: tuple[float, float]) -> None:
    """One real batch (known users, with and without a location, an unknown user) so the first
    request after a swap does not pay for first-touch page faults of the index."""
    queries = [
        RetrievalQuery(user_row=row, location=location, k=200, nprobe=0, radius_km=8.0)
        for row in (0, 1, -1)
        for location in (None, Location(*centre))
    ]
    retriever.retrieve_batch(queries)


def _pinned(experiments: Mapping[str, Any]) -> dict[str, set[str]]:
    return {name: set(by_version) for name, by_version in arm_pins(experiments).items()}


def rejection_reason(message: str) -> str:
    """A bounded label for why a model was refused (the message itself goes to the log)."""
    lowered = message.lower()
    for needle, reason in (
        ("scores nan", "nan"),
        ("feature schema", "schema"),
        ("categorical", "schema"),
        ("golden", "golden"),
        ("budget", "latency"),
        ("do not match the manifest", "corrupt"),
        ("not a lightgbm model", "corrupt"),
        ("no manifest", "corrupt"),
    ):
        if needle in lowered:
            return reason
    return "other"


def all_user_rows(tables: FeatureTables) -> npt.NDArray[np.float64]:
    """Every user's feature row: the local copy behind the online feature store (its fallback).
    10,000 users x 52 columns is 4 MB; a catalogue of millions of users would map a file."""
    return user_feature_rows(tables, np.arange(tables.n_users))


def artifact_root(path: Path) -> ArtifactRoot:
    if not path.is_dir():
        raise StateError(f"--artifacts {path}: no such directory; run `recsys build --out {path}`")
    return ArtifactRoot(path)
