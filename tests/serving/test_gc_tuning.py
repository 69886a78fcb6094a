"""The collector of a serving process: the loaded heap frozen, the young threshold set, every
pass timed into recsys_gc_pause_seconds and what it freed counted into
recsys_gc_collected_objects."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from recsys.serving.server import RunningServer
from tests.serving.test_server import Client
from tests.serving.toy_pipeline import ToyOpener, toy_settings

PAUSES = "recsys_gc_pause_seconds_count"
COLLECTED = "recsys_gc_collected_objects_total"


@pytest.fixture
def collector_restored() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("collector_restored")
async def test_a_server_freezes_its_loaded_heap_and_times_every_collection(
    tmp_path: Path,
) -> None:
    gc.unfreeze()
    settings = toy_settings(tmp_path, gc_gen0_threshold=12_345)
    running = await RunningServer.start(settings, ToyOpener())
    try:
        await running.wait_ready()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold()[0] == 12_345
        registry = running.metrics.registry
        before = registry.get_sample_value(PAUSES, {"generation": "2"}) or 0.0
        gc.collect()
        assert registry.get_sample_value(PAUSES, {"generation": "2"}) == before + 1
    finally:
        await running.stop()
    gc.collect()  # after stop, the server no longer observes passes
    assert running.metrics.registry.get_sample_value(PAUSES, {"generation": "2"}) == before + 1


@pytest.mark.usefixtures("collector_restored")
async def test_threshold_zero_leaves_the_collector_as_python_has_it(tmp_path: Path) -> None:
    gc.unfreeze()
    thresholds = gc.get_threshold()
    running = await RunningServer.start(toy_settings(tmp_path, gc_gen0_threshold=0), ToyOpener())
    try:
        await running.wait_ready()
        assert gc.get_freeze_count() == 0
        assert gc.get_threshold() == thresholds
    finally:
        await running.stop()


def cycles(n: int) -> None:
    """``n`` lists, each holding itself: garbage only the collector frees, once dropped."""
    for _ in range(n):
        ring: list[object] = []
        ring.append(ring)


@pytest.mark.usefixtures("collector_restored")
async def test_a_server_counts_the_objects_a_pass_frees_by_generation(tmp_path: Path) -> None:
    gc.unfreeze()
    running = await RunningServer.start(
        toy_settings(tmp_path, gc_gen0_threshold=1_000), ToyOpener()
    )
    try:
        await running.wait_ready()
        registry = running.metrics.registry
        before = registry.get_sample_value(COLLECTED, {"generation": "2"}) or 0.0
        gc.disable()  # no pass of the young generation may take them first
        try:
            cycles(500)
            assert gc.collect() >= 500
        finally:
            gc.enable()
        after = registry.get_sample_value(COLLECTED, {"generation": "2"})
        assert after is not None
        assert after - before >= 500
    finally:
        await running.stop()


@pytest.mark.usefixtures("collector_restored")
async def test_every_call_over_grpc_leaves_garbage_only_the_collector_frees(
    tmp_path: Path,
) -> None:
    """What the young threshold is sized for (serving/gc_tuning.py): grpc.aio looks up each
    call's handler in a coroutine whose scope holds a closure over itself, so each call served
    leaves its handler call details in a reference cycle. If this fails, gRPC stopped doing so
    and ``gc_gen0_threshold`` should be measured again."""
    running = await RunningServer.start(toy_settings(tmp_path), ToyOpener())
    client = Client(running)
    calls = 40
    try:
        await running.wait_ready()
        await client.recommend(user_id="user-1", num_results=3)  # warm: channel, first call
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what a pass finds unreachable lands in gc.garbage
        try:
            for n in range(calls):
                await client.recommend(user_id=f"user-{n}", num_results=3)
            gc.collect()
            found = [type(o).__name__ for o in gc.garbage]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert found.count("_HandlerCallDetails") >= calls
        assert len(found) >= 4 * calls  # with its scope, closure and metadata
    finally:
        await client.close()
        await running.stop()
