"""Model hot swap on a real server: a swap storm under load, refusals, arm pins, unloading.

The storm runs concurrent clients over a real socket while 50 promotions and rollbacks are
written through the registry. Nothing here asserts on time: it counts failed calls (must be
none) and checks every response's model version against the snapshots the server had swapped in
while that call was in flight (recorded where the server swaps them).
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from recsys.artifacts import ArtifactRoot
from recsys.build import BuildReport
from recsys.control.backends import open_store
from recsys.control.store import ROUTING, DocumentStore
from recsys.pipeline.loading import SnapshotCompiler
from recsys.pipeline.snapshot import ServingSnapshot
from recsys.ranking.model_cache import ModelCache, UnloadGrace
from recsys.ranking.registry import ModelRegistry
from recsys.ranking.routing import RoutingTable
from recsys.serving.metrics import ServingMetrics
from recsys.serving.pipeline import Pipeline, open_pipeline
from recsys.serving.server import RunningServer
from recsys.settings import ServeSettings
from recsys.v1 import recommender_pb2, recommender_pb2_grpc

NAME = "ranker"
SWAPS = 50
CLIENTS = 4
USERS = [f"user-{n:07d}" for n in range(1, 400)] + ["never-seen-1", "never-seen-2"]


@pytest.fixture(scope="module")
def two_versions(
    built_world: tuple[Path, BuildReport], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str, str]:
    out = tmp_path_factory.mktemp("hot-swap") / "artifacts"
    shutil.copytree(built_world[0], out, ignore=shutil.ignore_patterns("exposures"))
    store = open_store("", out)
    try:
        second = ModelRegistry(ArtifactRoot(out), store).train(NAME, seed=23)
    finally:
        store.close()
    return out, built_world[1].model_version, second


@dataclass
class Served:
    server: RunningServer
    pipeline: Pipeline
    store: DocumentStore
    registry: ModelRegistry
    swaps: list[tuple[float, ServingSnapshot]] = field(default_factory=list)
    """(monotonic time, snapshot) of every snapshot the server swapped in, oldest first."""

    def routing(self) -> RoutingTable:
        return self.pipeline.snapshot.routing

    def snapshots_during(self, start: float, end: float) -> list[ServingSnapshot]:
        """Snapshots current at some moment of [start, end]."""
        out = []
        for (since, state), following in itertools.zip_longest(self.swaps, self.swaps[1:]):
            until = following[0] if following else float("inf")
            if since <= end and until >= start:
                out.append(state)
        return out


@pytest.fixture
async def served(two_versions: tuple[Path, str, str], tmp_path: Path) -> AsyncIterator[Served]:
    artifacts = tmp_path / "artifacts"
    shutil.copytree(two_versions[0], artifacts)
    settings = ServeSettings(
        artifacts=artifacts,
        port=0,
        metrics_port=0,
        control_poll_seconds=0.02,
        drain_seconds=2,
        # Admission control is not under test here: a slow shared machine must not shed load.
        max_queue_delay_ms=600_000,
        max_queue=100_000,
    )
    opened: list[Pipeline] = []

    async def opener(s: ServeSettings, metrics: ServingMetrics) -> Pipeline:
        pipeline = await open_pipeline(s, metrics)
        opened.append(pipeline)
        return pipeline

    running = await RunningServer.start(settings, opener)
    await running.wait_ready()
    pipeline = opened[0]
    store = open_store("", artifacts)
    result = Served(running, pipeline, store, ModelRegistry(ArtifactRoot(artifacts), store))
    result.swaps.append((float("-inf"), pipeline.snapshot))
    follower = pipeline._follower
    assert follower is not None
    swap_in: Callable[[ServingSnapshot], None] = follower._set_snapshot

    def recording_swap(state: ServingSnapshot) -> None:
        # Recorded before the swap: a call that read the old snapshot just before still
        # overlaps the old one's interval.
        result.swaps.append((time.monotonic(), state))
        swap_in(state)

    follower._set_snapshot = recording_swap
    yield result
    store.close()
    await running.stop()


async def _until(condition: Callable[[], bool], what: str, patience: float = 120.0) -> None:
    """Poll ``condition``; the generous limit only turns a hang into a clear failure."""
    deadline = time.monotonic() + patience
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass
class Call:
    start: float
    end: float
    user_id: str
    model_version: str


async def test_swap_storm_fails_no_request_and_every_response_names_a_routed_version(
    served: Served, two_versions: tuple[Path, str, str]
) -> None:
    _, first, second = two_versions
    calls: list[Call] = []
    failures: list[str] = []
    stop = asyncio.Event()

    async def client(n: int) -> None:
        users = itertools.cycle(USERS[n::CLIENTS])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{served.server.port}") as channel:
            stub = recommender_pb2_grpc.RecommenderStub(channel)
            while not stop.is_set():
                user = next(users)
                start = time.monotonic()
                try:
                    reply = await stub.Recommend(
                        recommender_pb2.RecommendRequest(user_id=user, num_results=10)
                    )
                except grpc.aio.AioRpcError as e:
                    failures.append(f"{user}: {e.code()} {e.details()}")
                    continue
                calls.append(Call(start, time.monotonic(), user, reply.model_version))

    clients = [asyncio.create_task(client(n)) for n in range(CLIENTS)]
    try:
        await _until(lambda: len(calls) >= 20, "the first responses")
        for step in range(SWAPS):
            target = second if step % 2 == 0 else first
            if step % 2 == 0:
                await asyncio.to_thread(served.registry.promote, NAME, second)
            else:
                await asyncio.to_thread(served.registry.rollback, NAME)
            await _until(
                lambda t=target: served.routing().models[NAME].production == t,  # type: ignore[misc]
                f"swap {step} to {target}",
            )
            seen = len(calls)
            await _until(lambda s=seen: len(calls) >= s + 5, f"responses after swap {step}")  # type: ignore[misc]
    finally:
        stop.set()
        await asyncio.gather(*clients)

    assert failures == []
    assert len(served.swaps) == SWAPS + 1
    served_by = {c.model_version for c in calls}
    assert served_by == {first, second}
    wrong = []
    for call in calls:
        allowed = {
            state.routing.resolve(NAME, call.user_id)
            for state in served.snapshots_during(call.start, call.end)
        }
        if call.model_version not in allowed:
            wrong.append((call, allowed))
    assert wrong == []
    # Both versions stay loaded (production and previous); nothing else accumulates.
    assert set(served.pipeline.snapshot.models) == {first, second}
    follower = served.pipeline._follower
    assert follower is not None
    assert {v for _, v in follower._compiler.models.loaded()} == {first, second}


async def test_a_version_that_fails_validation_never_serves(
    served: Served, two_versions: tuple[Path, str, str]
) -> None:
    _, first, second = two_versions
    models = served.server.settings.artifacts / "models" / NAME
    model_file = models / second / "model.txt"
    model_file.write_text(model_file.read_text().replace("leaf_value=", "leaf_value=7", 1))
    routing = served.store.read(ROUTING)
    assert routing is not None
    served.store.write(
        ROUTING,
        {**routing.body, "models": {NAME: {"production": second, "previous": first}}},
        expected_version=routing.version,
        author="test: bypassing the CLI's validation",
    )
    value = served.server.metrics.registry.get_sample_value
    labels = {"name": NAME, "version": second, "reason": "corrupt"}
    await _until(lambda: (value("recsys_model_rejected_total", labels) or 0) >= 1, "rejection")
    assert value("recsys_control_rejected_documents_total", {"document": ROUTING}) == 1
    assert served.routing().models[NAME].production == first
    async with grpc.aio.insecure_channel(f"127.0.0.1:{served.server.port}") as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        reply = await stub.Recommend(recommender_pb2.RecommendRequest(user_id=USERS[0]))
    assert reply.model_version == first


async def test_an_arm_pinned_version_is_loaded_before_its_arm_serves(
    served: Served, two_versions: tuple[Path, str, str]
) -> None:
    _, first, second = two_versions
    experiments = served.store.read("experiments")
    assert experiments is not None
    body = dict(experiments.body)
    body["layers"] = [
        *body["layers"],
        {
            "name": "ranker-versions",
            "salt": "ranker-versions",
            "launch_defaults": {},
            "experiments": [
                {
                    "name": "new-ranker",
                    "status": "running",
                    "epoch": 0,
                    "buckets": [[0, 10_000]],
                    "arms": [{"name": "pinned", "weight": 1, "params": {"model_version": second}}],
                }
            ],
        },
    ]
    served.store.write(
        "experiments", body, expected_version=experiments.version, author="test: pin"
    )
    await _until(lambda: second in served.pipeline.snapshot.models, "the pinned version to load")
    assert served.routing().models[NAME].production == first  # routing unchanged
    async with grpc.aio.insecure_channel(f"127.0.0.1:{served.server.port}") as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        reply = await stub.Recommend(recommender_pb2.RecommendRequest(user_id=USERS[3]))
    assert reply.model_version == second
    assert any(e.experiment == "new-ranker" for e in reply.experiments)


def test_versions_no_longer_needed_are_unloaded_after_the_grace_period(
    two_versions: tuple[Path, str, str], tmp_path: Path
) -> None:
    source, first, second = two_versions
    artifacts = tmp_path / "artifacts"
    shutil.copytree(source, artifacts)
    store = open_store("", artifacts)
    try:
        docs = {
            n: d.body for n in ("routing", "experiments", "availability") if (d := store.read(n))
        }
    finally:
        store.close()
    now = [1000.0]
    loader = SnapshotCompiler(
        ArtifactRoot(artifacts),
        ModelCache(ArtifactRoot(artifacts)),
        UnloadGrace(30, clock=lambda: now[0]),
    )
    state = loader.initial(docs, "1")
    assert set(state.models) == {first}
    index = docs["routing"]["index"]
    state = loader.with_routing(
        state, {"index": index, "models": {NAME: {"production": second, "previous": first}}}
    )
    assert set(state.models) == {first, second}
    # The previous production is dropped from the route: it stays for the grace period ...
    state = loader.with_routing(state, {"index": index, "models": {NAME: {"production": second}}})
    assert set(state.models) == {first, second}
    now[0] += 29
    assert loader.unload_expired(state) is None
    # ... and is unloaded once it has passed, from the snapshot and from the loader.
    now[0] += 2
    unloaded = loader.unload_expired(state)
    assert unloaded is not None
    assert set(unloaded.models) == {second}
    assert loader.models.loaded() == {(NAME, second)}
    assert loader.unload_expired(unloaded) is None
