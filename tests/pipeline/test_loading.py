"""Building serving snapshots from the small built world: index loading and every document change.

The module's artifact root is a copy of the built one with two more ranker versions: a copy of
the built version under another id (valid: for arm pins) and a copy whose model.txt was
overwritten (corrupt: for refusals).
"""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recsys.artifacts import ArtifactRoot
from recsys.build import BuildReport
from recsys.control.backends import open_store
from recsys.control.store import AVAILABILITY, DOCUMENTS, EXPERIMENTS, ROUTING
from recsys.pipeline.loading import IndexLoader, SnapshotCompiler, SnapshotError
from recsys.pipeline.snapshot import ControlDocument, ServingSnapshot
from recsys.ranking.model import MODEL_FILE
from recsys.ranking.model_cache import ModelCache, UnloadGrace
from recsys.ranking.routing import arm_pins
from recsys.retrieval.retriever import RetrievalQuery
from tests.ranking.doubles import Clock, Rejections

NAME = "ranker"
PINNED = "a1a1a1a1a1a1"
CORRUPT = "c0ffeec0ffee"
KNOWN_USER = "user-0000001"


@pytest.fixture(scope="module")
def root(
    built_world: tuple[Path, BuildReport], tmp_path_factory: pytest.TempPathFactory
) -> ArtifactRoot:
    out = tmp_path_factory.mktemp("loading") / "artifacts"
    shutil.copytree(built_world[0], out, ignore=shutil.ignore_patterns("exposures"))
    root = ArtifactRoot(out)
    production = root.models(NAME) / built_world[1].model_version
    shutil.copytree(production, root.models(NAME) / PINNED)
    shutil.copytree(production, root.models(NAME) / CORRUPT)
    (root.models(NAME) / CORRUPT / MODEL_FILE).write_text("tree\nversion=v4\nnot a model\n")
    return root


@pytest.fixture(scope="module")
def report(built_world: tuple[Path, BuildReport]) -> BuildReport:
    return built_world[1]


@pytest.fixture(scope="module")
def documents(root: ArtifactRoot) -> dict[str, dict[str, Any]]:
    store = open_store("", root.path)
    try:
        docs = {name: store.read(name) for name in DOCUMENTS}
    finally:
        store.close()
    bodies: dict[str, dict[str, Any]] = {}
    for name, doc in docs.items():
        assert doc is not None, name
        bodies[name] = doc.body
    return bodies


@pytest.fixture
def docs(documents: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The built control documents, a copy each test may change."""
    return copy.deepcopy(documents)


@pytest.fixture
def rejections() -> Rejections:
    return Rejections()


@pytest.fixture
def compiler(root: ArtifactRoot, rejections: Rejections) -> SnapshotCompiler:
    cache = ModelCache(root, compile_models=False, on_rejected=rejections)
    return SnapshotCompiler(root, cache, UnloadGrace(30.0, clock=Clock()))


@pytest.fixture
def snapshot(compiler: SnapshotCompiler, docs: dict[str, dict[str, Any]]) -> ServingSnapshot:
    return compiler.initial(docs, "1", versions={ROUTING: 1, EXPERIMENTS: 1, AVAILABILITY: 1})


def _pinning(experiments: dict[str, Any], version: str) -> dict[str, Any]:
    """The experiments document with the k400 arm of retrieval-depth also pinning ``version``."""
    doc = copy.deepcopy(experiments)
    (layer,) = [layer for layer in doc["layers"] if layer["name"] == "retrieval"]
    (experiment,) = layer["experiments"]
    (arm,) = [arm for arm in experiment["arms"] if arm["name"] == "k400"]
    arm["params"]["model_version"] = version
    return doc


def _retrieved(snapshot: ServingSnapshot, k: int = 50) -> np.ndarray:
    row = int(snapshot.tables.user_rows([KNOWN_USER])[0])
    assert row >= 0
    (candidates,) = snapshot.retriever.retrieve_batch(
        [RetrievalQuery(user_row=row, location=None, k=k, nprobe=0, radius_km=8.0)]
    )
    return candidates.sku_ids


def _facts(snapshot: ServingSnapshot) -> dict[str, Any]:
    """What a caller can see of a snapshot (its parts by identity), to check it did not change."""
    return {
        "id": snapshot.snapshot_id,
        "manifest": snapshot.manifest(),
        "models": {version: id(model) for version, model in snapshot.models.items()},
        "routing": id(snapshot.routing),
        "pins": dict(snapshot.pins),
        "availability": id(snapshot.availability),
        "retriever": id(snapshot.retriever),
        "assigner": id(snapshot.assigner),
        "documents": dict(snapshot.documents),
    }


# -- IndexLoader ---------------------------------------------------------------------------------


def test_loading_the_built_index_returns_its_lineage_and_inputs(
    root: ArtifactRoot, report: BuildReport
) -> None:
    loaded = IndexLoader(root).load(report.index_version)

    assert loaded.lineage.index_version == report.index_version
    assert loaded.lineage.features_version == report.features_version
    assert loaded.lineage.world_version == report.world_version
    assert loaded.lineage == root.lineage(report.index_version)
    assert loaded.index.version == report.index_version
    assert loaded.tables.item_vectors.shape[0] == loaded.world.catalogue.n_items


def test_loading_an_unknown_index_version_names_it(root: ArtifactRoot) -> None:
    with pytest.raises(SnapshotError, match=re.escape("index nosuchindex0: cannot load it")):
        IndexLoader(root).load("nosuchindex0")


def test_loading_an_index_whose_file_was_changed_is_refused_naming_it(
    artifacts: Path, report: BuildReport
) -> None:
    root = ArtifactRoot(artifacts)
    (root.indexes / report.index_version / "index.faiss").write_bytes(b"not an index")

    with pytest.raises(
        SnapshotError, match=re.escape(f"index {report.index_version}: cannot load it")
    ):
        IndexLoader(root).load(report.index_version)


# -- SnapshotCompiler.initial --------------------------------------------------------------------


@pytest.mark.parametrize("missing", DOCUMENTS)
def test_the_first_snapshot_needs_every_control_document(
    compiler: SnapshotCompiler, docs: dict[str, dict[str, Any]], missing: str
) -> None:
    del docs[missing]

    with pytest.raises(SnapshotError, match=f"control plane has no {missing} document"):
        compiler.initial(docs, "1")


def test_the_first_snapshot_names_every_missing_document(compiler: SnapshotCompiler) -> None:
    with pytest.raises(
        SnapshotError, match="control plane has no routing, experiments, availability document"
    ):
        compiler.initial({}, "1")


def test_the_first_snapshot_serves_what_the_routing_names(
    snapshot: ServingSnapshot, report: BuildReport, docs: dict[str, dict[str, Any]]
) -> None:
    assert snapshot.index.version == report.index_version
    assert snapshot.features_version == report.features_version
    assert snapshot.world_version == report.world_version
    assert list(snapshot.models) == [report.model_version]
    assert snapshot.routing.models[NAME].production == report.model_version
    assert snapshot.pins == {}
    assert snapshot.documents == {name: ControlDocument(1, docs[name]) for name in DOCUMENTS}
    assert snapshot.snapshot_id


def test_the_first_snapshot_loads_versions_pinned_by_arms(
    compiler: SnapshotCompiler, docs: dict[str, dict[str, Any]], report: BuildReport
) -> None:
    docs[EXPERIMENTS] = _pinning(docs[EXPERIMENTS], PINNED)

    snapshot = compiler.initial(docs, "1")

    assert snapshot.pins == {NAME: frozenset({PINNED})}
    assert set(snapshot.models) == {report.model_version, PINNED}


# -- with_availability ---------------------------------------------------------------------------


def test_switching_items_off_changes_the_new_snapshot_only(
    compiler: SnapshotCompiler, snapshot: ServingSnapshot
) -> None:
    before = _facts(snapshot)
    served = _retrieved(snapshot)
    off = [int(sku) for sku in served[:3]]
    assert snapshot.availability.item_mask[off].all()

    changed = compiler.with_availability(snapshot, {"skus_off": off}, 2)

    assert not changed.availability.item_mask[off].any()
    assert not set(_retrieved(changed).tolist()) & set(off)
    assert changed.documents[AVAILABILITY] == ControlDocument(2, {"skus_off": off})
    assert changed.snapshot_id != snapshot.snapshot_id
    # The previous snapshot still serves them.
    assert _facts(snapshot) == before
    assert snapshot.availability.item_mask[off].all()
    assert set(off) <= set(_retrieved(snapshot).tolist())


def test_switching_a_restaurant_off_removes_all_its_items(
    compiler: SnapshotCompiler, snapshot: ServingSnapshot
) -> None:
    restaurant = int(snapshot.catalogue.item_restaurant[int(_retrieved(snapshot)[0])])

    changed = compiler.with_availability(snapshot, {"restaurants_off": [restaurant]})

    items = np.flatnonzero(snapshot.catalogue.item_restaurant == restaurant)
    assert not changed.availability.item_mask[items].any()
    assert snapshot.availability.item_mask[items].any()


def test_switching_availability_keeps_the_models_and_routing(
    compiler: SnapshotCompiler, snapshot: ServingSnapshot
) -> None:
    changed = compiler.with_availability(snapshot, {"skus_off": [0]})

    assert changed.models == snapshot.models
    assert changed.routing is snapshot.routing
    assert changed.index is snapshot.index


@pytest.mark.parametrize(
    "doc",
    [{"skus_off": [10**9]}, {"skus_off": "all"}, {"closed": [1]}],
    ids=["out-of-range", "not-a-list", "unknown-field"],
)
def test_an_invalid_availability_document_is_refused_naming_it(
    compiler: SnapshotCompiler, snapshot: ServingSnapshot, doc: dict[str, Any]
) -> None:
    before = _facts(snapshot)

    with pytest.raises(SnapshotError, match=r"^availability: "):
        compiler.with_availability(snapshot, doc)

    assert _facts(snapshot) == before


# -- with_experiments and pins -------------------------------------------------------------------


def test_arm_pins_reads_the_model_version_of_an_arm(docs: dict[str, dict[str, Any]]) -> None:
    assert arm_pins(docs[EXPERIMENTS]) == {}
    assert arm_pins(_pinning(docs[EXPERIMENTS], PINNED)) == {
        NAME: {PINNED: {"retrieval-depth/k400"}}
    }


def test_new_experiments_keep_their_pins_on_the_new_snapshot_as_a_value(
    compiler: SnapshotCompiler,
    snapshot: ServingSnapshot,
    docs: dict[str, dict[str, Any]],
    report: BuildReport,
) -> None:
    before = _facts(snapshot)
    doc = _pinning(docs[EXPERIMENTS], PINNED)

    changed = compiler.with_experiments(snapshot, doc, 2)

    assert changed.pins == {NAME: frozenset({PINNED})}
    assert set(changed.models) == {report.model_version, PINNED}
    assert changed.models[PINNED] is compiler.models.get(NAME, PINNED)
    assert changed.assigner.version == "2"
    assert changed.documents[EXPERIMENTS] == ControlDocument(2, doc)
    assert _facts(snapshot) == before


def test_experiments_without_pins_clear_the_pins_and_the_pinned_version_stays_for_its_grace(
    compiler: SnapshotCompiler, snapshot: ServingSnapshot, docs: dict[str, dict[str, Any]]
) -> None:
    pinned = compiler.with_experiments(snapshot, _pinning(docs[EXPERIMENTS], PINNED), 2)

    unpinned = compiler.with_experiments(pinned, docs[EXPERIMENTS], 3)

    assert unpinned.pins == {}
    assert PINNED in unpinned.models  # the grace clock has not moved


def test_routing_uses_the_pins_of_the_snapshot_it_is_given(
    compiler: SnapshotCompiler,
    snapshot: ServingSnapshot,
    docs: dict[str, dict[str, Any]],
    report: BuildReport,
) -> None:
    pinned = compiler.with_experiments(snapshot, _pinning(docs[EXPERIMENTS], PINNED), 2)

    # The compiler last saw the pinning document; the unpinned snapshot must not inherit it.
    from_unpinned = compiler.with_routing(snapshot, docs[ROUTING], 2)
    from_pinned = compiler.with_routing(pinned, docs[ROUTING], 2)

    assert from_unpinned.pins == {}
    assert set(from_unpinned.models) == {report.model_version}
    assert from_pinned.pins == {NAME: frozenset({PINNED})}
    assert set(from_pinned.models) == {report.model_version, PINNED}


def test_a_new_routing_replaces_the_routing_and_records_the_document(
    compiler: SnapshotCompiler,
    snapshot: ServingSnapshot,
    docs: dict[str, dict[str, Any]],
    report: BuildReport,
) -> None:
    doc = copy.deepcopy(docs[ROUTING])
    doc["models"][NAME]["previous"] = PINNED

    changed = compiler.with_routing(snapshot, doc, 2)

    assert changed.routing.models[NAME].previous == PINNED
    assert set(changed.models) == {report.model_version, PINNED}
    assert changed.index is snapshot.index  # same index version: not reloaded
    assert changed.documents[ROUTING] == ControlDocument(2, doc)
    assert snapshot.routing.models[NAME].previous == ""


def test_a_routing_to_a_version_not_in_the_registry_is_refused_naming_it(
    compiler: SnapshotCompiler, snapshot: ServingSnapshot, docs: dict[str, dict[str, Any]]
) -> None:
    doc = copy.deepcopy(docs[ROUTING])
    doc["models"][NAME]["canary"] = {"version": "notregistered", "percent": 5}
    before = _facts(snapshot)

    with pytest.raises(SnapshotError, match=re.escape("unknown version(s) ['notregistered']")):
        compiler.with_routing(snapshot, doc, 2)

    assert _facts(snapshot) == before


# -- rejected model versions ---------------------------------------------------------------------


def test_a_routing_to_a_rejected_version_raises_and_leaves_the_previous_snapshot_untouched(
    compiler: SnapshotCompiler,
    snapshot: ServingSnapshot,
    docs: dict[str, dict[str, Any]],
    rejections: Rejections,
) -> None:
    doc = copy.deepcopy(docs[ROUTING])
    doc["models"][NAME]["canary"] = {"version": CORRUPT, "percent": 5}
    before = _facts(snapshot)

    with pytest.raises(SnapshotError, match=re.escape(f"model {NAME}/{CORRUPT} rejected")):
        compiler.with_routing(snapshot, doc, 2)

    assert _facts(snapshot) == before
    assert rejections.calls == [(NAME, CORRUPT, "corrupt")]


def test_experiments_pinning_a_rejected_version_raise_and_leave_the_previous_snapshot_untouched(
    compiler: SnapshotCompiler,
    snapshot: ServingSnapshot,
    docs: dict[str, dict[str, Any]],
    rejections: Rejections,
) -> None:
    before = _facts(snapshot)

    with pytest.raises(SnapshotError, match="rejected, it will not serve"):
        compiler.with_experiments(snapshot, _pinning(docs[EXPERIMENTS], CORRUPT), 2)

    assert _facts(snapshot) == before
    assert rejections.calls == [(NAME, CORRUPT, "corrupt")]


def test_a_first_snapshot_routing_to_a_rejected_version_is_refused(
    compiler: SnapshotCompiler, docs: dict[str, dict[str, Any]]
) -> None:
    docs[ROUTING]["models"][NAME]["production"] = CORRUPT

    with pytest.raises(SnapshotError, match=re.escape(f"model {NAME}/{CORRUPT} rejected")):
        compiler.initial(docs, "1")
