"""Following the control plane on a small built world: seeding documents, swapping snapshots."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recsys.control.backends import open_store
from recsys.control.file_store import FileStore
from recsys.control.store import (
    AVAILABILITY,
    DOCUMENTS,
    EXPERIMENTS,
    ROUTING,
    Document,
    DocumentStore,
)
from recsys.pipeline.loading import SnapshotCompiler, artifact_root
from recsys.pipeline.snapshot import ServingSnapshot
from recsys.ranking.model_cache import ModelCache
from recsys.serving.control import ControlFollower, read_documents
from recsys.serving.metrics import ServingMetrics

REJECTED = "recsys_control_rejected_documents_total"


def other_store(tmp_path: Path, artifacts: Path) -> DocumentStore:
    """A second, empty file store (as a fresh Redis would be) outside the artifact root."""
    return open_store("file:" + str(tmp_path / "x"), artifacts)


# read_documents


def test_a_missing_document_is_seeded_from_the_seed_store(artifacts: Path, tmp_path: Path) -> None:
    seed = open_store("", artifacts)
    store = other_store(tmp_path, artifacts)
    try:
        docs = read_documents(store, seed)
        for name in DOCUMENTS:
            original = seed.read(name)
            assert original is not None
            assert docs[name].body == original.body
            assert docs[name].version == 1
            assert docs[name].author == "seed:" + original.author
            stored = store.read(name)  # written to the store, not only returned
            assert stored is not None
            assert stored.body == original.body
            assert stored.version == 1
    finally:
        store.close()
        seed.close()


def test_an_existing_document_is_not_overwritten_by_the_seed(
    artifacts: Path, tmp_path: Path
) -> None:
    seed = open_store("", artifacts)
    store = other_store(tmp_path, artifacts)
    try:
        own = {"skus_off": [3, 4], "restaurants_off": [1]}
        store.write(AVAILABILITY, own, expected_version=0, author="ops")
        store.write(AVAILABILITY, own, expected_version=1, author="ops")
        docs = read_documents(store, seed)
        assert docs[AVAILABILITY].body == own
        assert docs[AVAILABILITY].version == 2
        assert docs[AVAILABILITY].author == "ops"
        kept = store.read(AVAILABILITY)
        assert kept is not None
        assert (kept.version, kept.body) == (2, own)
        assert [h.version for h in store.history(AVAILABILITY)] == [2, 1]
        # the other documents were missing, so they were seeded
        assert docs[ROUTING].author == "seed:build"
        assert docs[EXPERIMENTS].author == "seed:build"
    finally:
        store.close()
        seed.close()


def test_without_a_seed_store_a_missing_document_stays_missing(
    artifacts: Path, tmp_path: Path
) -> None:
    store = other_store(tmp_path, artifacts)
    try:
        store.write(ROUTING, {"index": "x", "models": {}}, expected_version=0, author="ops")
        docs = read_documents(store, None)
        assert list(docs) == [ROUTING]
        assert store.read(EXPERIMENTS) is None
        assert store.read(AVAILABILITY) is None
    finally:
        store.close()


class RacedStore(FileStore):
    """A file store where another server seeds each document right after this one found it
    missing: the first read of a name writes it through a second store and answers None."""

    def __init__(self, directory: Path, rival_body: Mapping[str, Any]) -> None:
        super().__init__(directory)
        self._rival = FileStore(directory)
        self._rival_body = rival_body
        self._raced: set[str] = set()

    def read(self, name: str) -> Document | None:
        if name not in self._raced:
            self._raced.add(name)
            self._rival.write(name, self._rival_body, expected_version=0, author="rival")
            return None
        return super().read(name)


def test_a_document_another_server_seeded_first_is_read_back_not_overwritten(
    artifacts: Path, tmp_path: Path
) -> None:
    seed = open_store("", artifacts)
    rival_body = {"seeded_by": "the other server"}
    store = RacedStore(tmp_path / "raced", rival_body)
    try:
        docs = read_documents(store, seed)
        assert set(docs) == set(DOCUMENTS)
        for name in DOCUMENTS:
            assert docs[name].author == "rival"
            assert docs[name].body == rival_body
            assert docs[name].version == 1
    finally:
        store.close()
        seed.close()


# ControlFollower


@dataclass
class Followed:
    """A follower over the artifact root's file store, and every snapshot it swapped in."""

    follower: ControlFollower
    metrics: ServingMetrics
    store: DocumentStore
    initial: ServingSnapshot
    docs: dict[str, Document]
    swaps: list[ServingSnapshot] = field(default_factory=list)

    @property
    def current(self) -> ServingSnapshot:
        return self.swaps[-1] if self.swaps else self.initial

    def rejected(self, name: str) -> float | None:
        return self.metrics.registry.get_sample_value(REJECTED, {"document": name})

    def document(self, name: str, body: Mapping[str, Any], version: int) -> Document:
        return Document(name, version, dict(body), "test", time.time())

    def body(self, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.docs[name].body)


@pytest.fixture
async def followed(artifacts: Path) -> AsyncIterator[Followed]:
    store = open_store("", artifacts)
    docs = read_documents(store, None)
    root = artifact_root(artifacts)
    compiler = SnapshotCompiler(root, ModelCache(root))
    versions = {name: doc.version for name, doc in docs.items()}
    initial = await asyncio.to_thread(
        compiler.initial,
        {name: doc.body for name, doc in docs.items()},
        str(docs[EXPERIMENTS].version),
        versions=versions,
    )
    metrics = ServingMetrics()
    holder: list[ServingSnapshot] = []

    def get_snapshot() -> ServingSnapshot:
        return holder[-1] if holder else initial

    def set_snapshot(snapshot: ServingSnapshot) -> None:
        holder.append(snapshot)

    follower = ControlFollower(
        url="",
        artifacts=artifacts,
        prefix="recsys:",
        poll_seconds=0.05,
        compiler=compiler,
        get_snapshot=get_snapshot,
        set_snapshot=set_snapshot,
        metrics=metrics,
        versions=versions,
    )
    yield Followed(follower, metrics, store, initial, docs, holder)
    await follower.close()
    store.close()


async def test_a_valid_availability_document_swaps_in_a_new_snapshot(followed: Followed) -> None:
    servable = np.flatnonzero(followed.initial.availability.item_mask)[:2].tolist()
    assert len(servable) == 2
    body = {"skus_off": servable, "restaurants_off": []}
    applied = await followed.follower.apply(followed.document(AVAILABILITY, body, 2))
    assert applied is True
    assert len(followed.swaps) == 1
    current = followed.current
    assert current is not followed.initial
    assert current.availability.skus_off.tolist() == servable
    assert not current.availability.item_mask[servable].any()
    assert followed.initial.availability.item_mask[servable].all()  # the old one is unchanged
    assert current.documents[AVAILABILITY].version == 2
    assert current.snapshot_id != followed.initial.snapshot_id
    assert followed.follower.applied[AVAILABILITY] == 2
    assert followed.rejected(AVAILABILITY) is None


async def test_a_valid_routing_document_swaps_in_a_snapshot_with_its_version(
    followed: Followed,
) -> None:
    applied = await followed.follower.apply(followed.document(ROUTING, followed.body(ROUTING), 3))
    assert applied is True
    current = followed.current
    assert current is not followed.initial
    assert current.documents[ROUTING].version == 3
    assert current.routing.to_document() == followed.docs[ROUTING].body
    assert followed.follower.applied[ROUTING] == 3


async def test_an_availability_document_with_a_sku_out_of_range_is_rejected_and_counted(
    followed: Followed,
) -> None:
    n_items = followed.initial.catalogue.n_items
    bad = {"skus_off": [1, n_items], "restaurants_off": []}
    applied = await followed.follower.apply(followed.document(AVAILABILITY, bad, 2))
    assert applied is False
    assert followed.swaps == []
    assert followed.current is followed.initial
    assert followed.follower.applied[AVAILABILITY] == 1
    assert followed.rejected(AVAILABILITY) == 1
    assert followed.rejected(ROUTING) is None


async def test_a_routing_document_naming_an_unknown_model_version_is_rejected_and_counted(
    followed: Followed, caplog: pytest.LogCaptureFixture
) -> None:
    body = followed.body(ROUTING)
    body["models"]["ranker"]["production"] = "no-such-version"
    applied = await followed.follower.apply(followed.document(ROUTING, body, 2))
    assert applied is False
    assert followed.swaps == []
    assert followed.follower.applied[ROUTING] == 1
    assert followed.rejected(ROUTING) == 1
    (logged,) = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert "routing version 2 rejected" in logged.getMessage()
    assert "no-such-version" in logged.getMessage()


async def test_after_a_rejection_the_next_valid_document_still_applies(
    followed: Followed,
) -> None:
    bad = {"skus_off": [-1], "restaurants_off": []}
    good = {"skus_off": [9], "restaurants_off": []}
    assert await followed.follower.apply(followed.document(AVAILABILITY, bad, 2)) is False
    assert await followed.follower.apply(followed.document(AVAILABILITY, bad, 3)) is False
    assert await followed.follower.apply(followed.document(AVAILABILITY, good, 4)) is True
    assert followed.rejected(AVAILABILITY) == 2
    assert followed.current.availability.skus_off.tolist() == [9]
    assert followed.follower.applied[AVAILABILITY] == 4


async def test_documents_of_different_names_applied_at_once_keep_each_others_change(
    followed: Followed,
) -> None:
    experiments = followed.body(EXPERIMENTS)
    experiments["kill_switch"] = True
    results = await asyncio.gather(
        followed.follower.apply(
            followed.document(AVAILABILITY, {"skus_off": [11], "restaurants_off": []}, 2)
        ),
        followed.follower.apply(followed.document(EXPERIMENTS, experiments, 5)),
        followed.follower.apply(followed.document(ROUTING, followed.body(ROUTING), 7)),
    )
    assert list(results) == [True, True, True]
    assert len(followed.swaps) == 3
    final = followed.current
    assert final.availability.skus_off.tolist() == [11]
    assert final.assigner.version == "5"
    assert final.documents[EXPERIMENTS].body["kill_switch"] is True
    assert {name: doc.version for name, doc in final.documents.items()} == {
        AVAILABILITY: 2,
        EXPERIMENTS: 5,
        ROUTING: 7,
    }
    assert followed.follower.applied == {AVAILABILITY: 2, EXPERIMENTS: 5, ROUTING: 7}


async def _until(condition: Callable[[], bool], what: str, patience: float = 60.0) -> None:
    """Poll ``condition``; the generous limit only turns a hang into a clear failure."""
    deadline = time.monotonic() + patience
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_a_started_follower_applies_new_versions_written_to_the_store(
    followed: Followed,
) -> None:
    followed.follower.start()
    await _until(
        lambda: (
            followed.metrics.registry.get_sample_value(
                "recsys_control_plane_connected", {"document": AVAILABILITY}
            )
            == 1
        ),
        "the availability watcher to connect",
    )
    assert followed.swaps == []  # the versions it started from are not applied again
    followed.store.write(
        AVAILABILITY, {"skus_off": [21], "restaurants_off": []}, expected_version=1, author="ops"
    )
    await _until(lambda: followed.follower.applied[AVAILABILITY] == 2, "version 2 to apply")
    assert followed.current.availability.skus_off.tolist() == [21]
    followed.store.write(
        AVAILABILITY, {"skus_off": [10**9], "restaurants_off": []}, expected_version=2, author="x"
    )
    await _until(lambda: followed.rejected(AVAILABILITY) == 1, "version 3 to be rejected")
    assert followed.follower.applied[AVAILABILITY] == 2
    assert followed.current.availability.skus_off.tolist() == [21]
