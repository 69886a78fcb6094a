"""Building serving snapshots: artifacts loaded and warmed, control documents compiled.

Two jobs, two classes:

- :class:`IndexLoader` loads one index version with the feature tables and world it was built
  from (the chain :meth:`~recsys.artifacts.ArtifactRoot.lineage` names), memory-mapped and
  validated;
- :class:`SnapshotCompiler` turns control documents (routing, experiments, availability) into
  a new :class:`~recsys.pipeline.snapshot.ServingSnapshot`, loading what the routing names
  through the :class:`~recsys.ranking.model_cache.ModelCache` and keeping versions that left
  the routing for their :class:`~recsys.ranking.model_cache.UnloadGrace`.

Everything here runs off the event loop. A document or artifact that fails validation raises
:class:`SnapshotError` naming it, and the previous snapshot keeps serving.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from recsys.artifacts import ArtifactError, ArtifactRoot, Lineage
from recsys.control.store import AVAILABILITY, DOCUMENTS, EXPERIMENTS, ROUTING
from recsys.experiments.assignment import Assigner, compile_config
from recsys.monitoring.baseline import BaselineCache
from recsys.pipeline.archive import SnapshotArchive
from recsys.pipeline.snapshot import ControlDocument, ServingSnapshot, snapshot_id
from recsys.ranking.feature_store import RedisUserStore, UserStore, open_user_store
from recsys.ranking.features import FeatureTables, load_feature_tables, user_feature_rows
from recsys.ranking.model import ModelRejected, RankingModel
from recsys.ranking.model_cache import ModelCache, UnloadGrace
from recsys.ranking.routing import RoutingError, RoutingTable, arm_pins, parse_routing
from recsys.retrieval.availability import Availability
from recsys.retrieval.index import ItemIndex
from recsys.retrieval.retriever import RetrievalQuery, Retriever
from recsys.settings import RedisAuth
from recsys.types import Location
from recsys.world import World, load_world


class SnapshotError(Exception):
    """A snapshot could not be built; the message says which document or artifact and why."""


@dataclass(frozen=True)
class LoadedIndex:
    lineage: Lineage
    world: World
    tables: FeatureTables
    index: ItemIndex


class IndexLoader:
    """Loads index versions with their inputs from one artifact root."""

    def __init__(self, root: ArtifactRoot) -> None:
        self.root = root

    def load(self, index_version: str) -> LoadedIndex:
        """Index version ``index_version`` with the feature tables and world it was built from:
        memory-mapped (tables, world, the index's vectors), validated (files, shapes, recall on
        the version's probe queries) and so warmed. Raises SnapshotError naming what is wrong."""
        try:
            lineage = self.root.lineage(index_version)
            world = load_world(lineage.world_dir)
            tables = load_feature_tables(lineage.features_dir, world.catalogue)
            index = ItemIndex.load(
                lineage.index_dir,
                expected_dimension=int(tables.item_vectors.shape[1]),
                expected_count=world.catalogue.n_items,
            )
        except (ArtifactError, KeyError, OSError, ValueError) as e:
            raise SnapshotError(f"index {index_version}: cannot load it or its inputs: {e}") from e
        return LoadedIndex(lineage, world, tables, index)


class SnapshotCompiler:
    """Builds the first snapshot and every later one from a changed document."""

    def __init__(
        self,
        root: ArtifactRoot,
        models: ModelCache,
        grace: UnloadGrace | None = None,
        archive: SnapshotArchive | None = None,
    ) -> None:
        """``archive``: where every snapshot's manifest is written once (None: nowhere)."""
        self.root = root
        self.indexes = IndexLoader(root)
        self.models = models
        self.grace = grace or UnloadGrace()
        self.archive = archive
        self.baselines = BaselineCache()

    def _sealed(self, snapshot: ServingSnapshot) -> ServingSnapshot:
        """``snapshot`` with its id, its manifest archived, its models' baselines compiled."""
        snapshot = replace(snapshot, baselines=self.baselines.for_models(snapshot.models))
        sealed = replace(snapshot, snapshot_id=snapshot_id(snapshot.manifest()))
        if self.archive is not None:
            try:
                self.archive.write(sealed)
            except OSError as e:
                raise SnapshotError(f"snapshot {sealed.snapshot_id}: cannot archive it: {e}") from e
        return sealed

    def initial(
        self,
        docs: Mapping[str, Mapping[str, Any]],
        config_version: str,
        *,
        feature_store: str = "",
        feature_store_prefix: str = "recsys:",
        feature_store_timeout_seconds: float = 0.005,
        feature_store_auth: RedisAuth | None = None,
        versions: Mapping[str, int] | None = None,
    ) -> ServingSnapshot:
        """Load everything named by the routing document and compile the other documents.

        ``versions``: each document's store version (recorded in the snapshot's manifest).

        ``feature_store``: where user feature rows are served from: "" the memory-mapped tables
        (the default, nothing in between), or redis://... the online store with the tables as
        the fallback (ranking/feature_store.py); index swaps keep the same store.
        """
        missing = [name for name in DOCUMENTS if name not in docs]
        if missing:
            raise SnapshotError(f"control plane has no {', '.join(missing)} document")
        routing = self._routing(docs[ROUTING])
        loaded = self.indexes.load(routing.index_version)
        catalogue = loaded.world.catalogue
        pins = _pinned(docs[EXPERIMENTS])
        availability = Availability.from_document(catalogue, docs[AVAILABILITY])
        user_store: UserStore | None = None
        if feature_store:
            try:
                user_store = open_user_store(
                    feature_store,
                    prefix=feature_store_prefix,
                    features_version=loaded.lineage.features_version,
                    user_ids=loaded.tables.user_ids,
                    user_vectors=all_user_rows(loaded.tables),
                    timeout_seconds=feature_store_timeout_seconds,
                    auth=feature_store_auth,
                )
            except ValueError as e:
                raise SnapshotError(f"feature store: {e}") from e
        tables = loaded.tables
        known = versions or {}
        return self._sealed(
            ServingSnapshot(
                catalogue=catalogue,
                tables=tables,
                index=loaded.index,
                retriever=Retriever(
                    loaded.index,
                    tables.user_vectors,
                    catalogue,
                    tables.item_popularity,
                    availability,
                ),
                models=self._models_for(routing, pins),
                routing=routing,
                assigner=self._assigner(docs[EXPERIMENTS], config_version),
                availability=availability,
                centre=(loaded.world.meta.center_lat, loaded.world.meta.center_lon),
                features_version=loaded.lineage.features_version,
                user_store=user_store,
                pins=pins,
                documents={
                    name: ControlDocument(int(known.get(name, 0)), docs[name]) for name in DOCUMENTS
                },
                world_version=loaded.lineage.world_version,
            )
        )

    def with_experiments(
        self, snapshot: ServingSnapshot, doc: Mapping[str, Any], version: int
    ) -> ServingSnapshot:
        assigner = self._assigner(doc, str(version))
        changed = replace(
            snapshot,
            assigner=assigner,
            pins=_pinned(doc),
            documents=_with_document(snapshot, EXPERIMENTS, version, doc),
        )
        return self._sealed(self._with_models(changed, snapshot.routing))

    def with_availability(
        self, snapshot: ServingSnapshot, doc: Mapping[str, Any], version: int = 0
    ) -> ServingSnapshot:
        try:
            availability = Availability.from_document(snapshot.catalogue, doc)
            retriever = snapshot.retriever.with_availability(availability)
        except ValueError as e:
            raise SnapshotError(f"availability: {e}") from e
        return self._sealed(
            replace(
                snapshot,
                availability=availability,
                retriever=retriever,
                documents=_with_document(snapshot, AVAILABILITY, version, doc),
            )
        )

    def with_routing(
        self, snapshot: ServingSnapshot, doc: Mapping[str, Any], version: int = 0
    ) -> ServingSnapshot:
        routing = self._routing(doc)
        changed = replace(
            self._with_index(snapshot, routing.index_version),
            documents=_with_document(snapshot, ROUTING, version, doc),
        )
        return self._sealed(self._with_models(changed, routing))

    def unload_expired(self, snapshot: ServingSnapshot) -> ServingSnapshot | None:
        """A snapshot without the versions whose grace has run out, or None if there are none."""
        if not self.grace.any_expired():
            return None
        return self._sealed(self._with_models(snapshot, snapshot.routing))

    def _with_index(self, snapshot: ServingSnapshot, index_version: str) -> ServingSnapshot:
        """The snapshot serving ``index_version`` (unchanged when it already does).

        The new version, its feature tables and world are loaded, validated and warmed by a
        real retrieval while the previous snapshot keeps serving; the caller then swaps the
        whole snapshot at once. The current availability switches carry over to the new
        catalogue, and an online feature store moves to the new features version.
        """
        if index_version == snapshot.index.version:
            return snapshot
        loaded = self.indexes.load(index_version)
        catalogue = loaded.world.catalogue
        tables = loaded.tables
        try:
            availability = Availability.from_document(catalogue, snapshot.availability.document())
            retriever = Retriever(
                loaded.index, tables.user_vectors, catalogue, tables.item_popularity, availability
            )
        except ValueError as e:
            raise SnapshotError(f"routing.index {index_version}: {e}") from e
        store = snapshot.user_store
        if isinstance(store, RedisUserStore):
            store = store.for_version(
                loaded.lineage.features_version, tables.user_ids, all_user_rows(tables)
            )
        centre = (loaded.world.meta.center_lat, loaded.world.meta.center_lon)
        warm_retriever(retriever, centre)
        return replace(
            snapshot,
            catalogue=catalogue,
            tables=tables,
            index=loaded.index,
            retriever=retriever,
            availability=availability,
            centre=centre,
            features_version=loaded.lineage.features_version,
            world_version=loaded.lineage.world_version,
            user_store=store,
        )

    def _with_models(self, snapshot: ServingSnapshot, routing: RoutingTable) -> ServingSnapshot:
        """The snapshot with ``routing``: every version it or an arm needs loaded and warmed.

        Versions no longer needed stay for the unload grace, then leave the snapshot and the
        cache; requests already running keep theirs through the snapshot they started on. The
        previous production is part of the route, so it stays loaded and a rollback is a
        pointer flip.
        """
        models = self._models_for(routing, snapshot.pins)
        kept = self.grace.kept(snapshot.models, models)
        self.models.keep_only([*models, *kept])
        return replace(snapshot, routing=routing, models={**kept, **models})

    def _routing(self, doc: Mapping[str, Any]) -> RoutingTable:
        try:
            return parse_routing(doc, known_versions=self.root.model_versions())
        except RoutingError as e:
            raise SnapshotError(f"routing: {e}") from e

    def _models_for(
        self, routing: RoutingTable, pins: Mapping[str, frozenset[str]]
    ) -> dict[str, RankingModel]:
        """Production, canary, previous production, and versions pinned by experiment arms."""
        needed = routing.loaded_versions()
        for name, pinned in pins.items():
            needed.setdefault(name, set()).update(pinned)
        models: dict[str, RankingModel] = {}
        for name, route_versions in sorted(needed.items()):
            for version in sorted(route_versions):
                try:
                    models[version] = self.models.get(name, version)
                except ModelRejected as e:
                    raise SnapshotError(
                        f"model {name}/{version} rejected, it will not serve: {e}"
                    ) from e
        return models

    def _assigner(self, doc: Mapping[str, Any], version: str) -> Assigner:
        known = {v for vs in self.root.model_versions().values() for v in vs}
        return compile_config(doc, version=version, known_model_versions=known)


def _with_document(
    snapshot: ServingSnapshot, name: str, version: int, body: Mapping[str, Any]
) -> dict[str, ControlDocument]:
    return {**snapshot.documents, name: ControlDocument(version, body)}


def warm_retriever(retriever: Retriever, centre: tuple[float, float]) -> None:
    """One real batch (known users, with and without a location, an unknown user) so the first
    request after a swap does not pay for first-touch page faults of the index."""
    queries = [
        RetrievalQuery(user_row=row, location=location, k=200, nprobe=0, radius_km=8.0)
        for row in (0, 1, -1)
        for location in (None, Location(*centre))
    ]
    retriever.retrieve_batch(queries)


def _pinned(experiments: Mapping[str, Any]) -> dict[str, frozenset[str]]:
    return {name: frozenset(by_version) for name, by_version in arm_pins(experiments).items()}


def all_user_rows(tables: FeatureTables) -> npt.NDArray[np.float64]:
    """Every user's feature row: the local copy behind the online feature store (its fallback).
    10,000 users x 52 columns is 4 MB; a catalogue of millions of users would map a file."""
    return user_feature_rows(tables, np.arange(tables.n_users))


def artifact_root(path: Path) -> ArtifactRoot:
    if not path.is_dir():
        raise SnapshotError(
            f"--artifacts {path}: no such directory; run `recsys build --out {path}`"
        )
    return ArtifactRoot(path)
