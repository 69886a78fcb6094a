"""Index versions swap live: routing names a new version, the server loads, validates and warms
it off the loop, then answers with it; a version that fails validation never serves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from recsys.artifacts import ArtifactRoot, read_manifest
from recsys.build import BuildReport
from recsys.control.backends import open_store
from recsys.pipeline.loading import SnapshotCompiler, SnapshotError
from recsys.ranking.feature_store import RedisUserStore
from recsys.ranking.model_cache import ModelCache
from recsys.retrieval.index import build_index, save_index_version
from recsys.serving.pipeline import open_pipeline
from recsys.serving.server import RunningServer
from recsys.settings import ServeSettings
from recsys.v1 import recommender_pb2, recommender_pb2_grpc
from tests.control.redis_helpers import redis_prefix, redis_url

__all__ = ["redis_prefix", "redis_url"]

KNOWN_USER = "user-0000001"


def publish_another_index(artifacts: Path, report: BuildReport, nlist: int) -> str:
    """A second index version over the same item vectors (another nlist: another version)."""
    root = ArtifactRoot(artifacts)
    features = root.features / report.features_version
    items = np.load(features / "item_vectors.npy")
    users = np.load(features / "user_vectors.npy")
    probe = users[np.flatnonzero(np.abs(users).sum(axis=1) > 0)[:64]]
    return save_index_version(
        root,
        build_index(items, seed=5, nlist=nlist),
        items,
        probe,
        features_version=report.features_version,
        k=100,
        target_recall=0.95,
    )


def route_index(artifacts: Path, index_version: str) -> None:
    store = open_store("", artifacts)
    try:
        routing = store.read("routing")
        assert routing is not None
        body = {**routing.body, "index": index_version}
        store.write("routing", body, expected_version=routing.version, author="test")
    finally:
        store.close()


@pytest.fixture
async def server(artifacts: Path) -> AsyncIterator[RunningServer]:
    settings = ServeSettings(
        artifacts=artifacts, port=0, metrics_port=0, control_poll_seconds=0.05, drain_seconds=2
    )
    running = await RunningServer.start(settings, open_pipeline)
    await running.wait_ready()
    yield running
    await running.stop()


async def _index_version(port: int) -> str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        reply = await stub.Recommend(
            recommender_pb2.RecommendRequest(user_id=KNOWN_USER, num_results=10)
        )
    assert len(reply.items) == 10
    return str(reply.index_version)


async def test_a_routed_index_version_serves_from_the_next_requests(
    server: RunningServer, artifacts: Path, built_world: tuple[Path, BuildReport]
) -> None:
    report = built_world[1]
    assert await _index_version(server.port) == report.index_version
    new = await asyncio.to_thread(publish_another_index, artifacts, report, 32)
    assert new != report.index_version
    route_index(artifacts, new)
    for _ in range(400):  # the follower polls every 50 ms; loading takes a moment
        if await _index_version(server.port) == new:
            break
        await asyncio.sleep(0.05)
    assert await _index_version(server.port) == new


def test_loader_swaps_in_a_validated_index_keeping_availability(
    artifacts: Path, built_world: tuple[Path, BuildReport]
) -> None:
    report = built_world[1]
    loader = SnapshotCompiler(ArtifactRoot(artifacts), ModelCache(ArtifactRoot(artifacts)))
    store = open_store("", artifacts)
    try:
        docs = {name: store.read(name) for name in ("routing", "experiments", "availability")}
    finally:
        store.close()
    bodies = {name: d.body for name, d in docs.items() if d is not None}
    bodies["availability"] = {"skus_off": [3, 4], "restaurants_off": [1]}
    state = loader.initial(bodies, "1")
    new = publish_another_index(artifacts, report, 32)
    swapped = loader.with_routing(state, {**bodies["routing"], "index": new})
    assert swapped.index.version == new
    assert swapped.retriever is not state.retriever
    assert state.index.version == report.index_version  # the old snapshot is untouched
    assert list(swapped.availability.skus_off) == [3, 4]
    assert not swapped.availability.item_mask[[3, 4]].any()
    assert swapped.index.measured_recall >= 0.9


def test_an_index_that_fails_validation_is_refused(
    artifacts: Path, built_world: tuple[Path, BuildReport]
) -> None:
    report = built_world[1]
    new = publish_another_index(artifacts, report, 32)
    # Corrupt the published file: its content hash no longer matches the manifest.
    index_file = ArtifactRoot(artifacts).indexes / new / "index.faiss"
    index_file.chmod(0o644)
    data = bytearray(index_file.read_bytes())
    data[-10] ^= 0xFF
    index_file.write_bytes(bytes(data))
    loader = SnapshotCompiler(ArtifactRoot(artifacts), ModelCache(ArtifactRoot(artifacts)))
    with pytest.raises(SnapshotError, match=new):
        loader.indexes.load(new)
    assert read_manifest(ArtifactRoot(artifacts).indexes / report.index_version)


def test_an_online_feature_store_follows_the_index_swap(
    artifacts: Path, built_world: tuple[Path, BuildReport], redis_url: str, redis_prefix: str
) -> None:
    report = built_world[1]
    loader = SnapshotCompiler(ArtifactRoot(artifacts), ModelCache(ArtifactRoot(artifacts)))
    store = open_store("", artifacts)
    try:
        bodies = {
            name: doc.body
            for name in ("routing", "experiments", "availability")
            if (doc := store.read(name)) is not None
        }
    finally:
        store.close()
    state = loader.initial(bodies, "1", feature_store=redis_url, feature_store_prefix=redis_prefix)
    assert isinstance(state.user_store, RedisUserStore)
    new = publish_another_index(artifacts, report, 32)
    swapped = loader.with_routing(state, {**bodies["routing"], "index": new})
    assert isinstance(swapped.user_store, RedisUserStore)
    assert swapped.user_store is not state.user_store
    with pytest.raises(SnapshotError, match="feature store"):
        loader.initial(bodies, "1", feature_store="http://nowhere")
