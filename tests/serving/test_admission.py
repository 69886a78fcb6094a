"""Admission control: shed at once beyond the bounds, honour client deadlines (real sockets)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest

from recsys.serving.batching import DeadlineExceeded, MicroBatcher, Overloaded
from recsys.serving.metrics import ServingMetrics
from recsys.serving.server import RunningServer
from recsys.settings import ServeSettings
from recsys.types import Recommendation, Request, ScoredItems, ServingVersions
from recsys.v1 import recommender_pb2, recommender_pb2_grpc


class Gate:
    """A batch function that blocks in the executor until released (or returns at once).
    Use as ``async with gate:`` so a failing test still releases it (else closing hangs)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, seconds: float = 0.0) -> None:
        self.loop = loop
        self.seconds = seconds
        self.open = asyncio.Event()
        self.open.set()
        self.batches: list[list[int]] = []

    async def __aenter__(self) -> Gate:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.open.set()

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        asyncio.run_coroutine_threadsafe(self.open.wait(), self.loop).result()
        time.sleep(self.seconds)
        return items


async def submitted(batcher: MicroBatcher[int, int], item: int) -> asyncio.Future[int]:
    """``batcher.submit(item)`` started, and given a turn of the loop to queue."""
    future = asyncio.ensure_future(batcher.submit(item))
    await asyncio.sleep(0.01)
    return future


async def test_a_stalled_batch_with_a_few_items_behind_it_sheds_none() -> None:
    # A garbage-collection pass or a CPU stall: the running batch takes far longer than the
    # bound, and the light load keeps queueing a few items behind it. None may be shed.
    gate = Gate(asyncio.get_running_loop())
    async with (
        MicroBatcher(gate, max_batch_size=8, max_delay=0, max_queue_delay=0.01) as batcher,
        gate,
    ):
        assert await batcher.submit(0) == 0  # one batch measured: the batch time is known
        gate.open.clear()
        stalled = await submitted(batcher, 1)
        behind = [await submitted(batcher, n) for n in range(2, 6)]
        await asyncio.sleep(0.1)  # ten times the bound
        later = [await submitted(batcher, n) for n in range(6, 9)]
        gate.open.set()
        assert await stalled == 1
        assert [await f for f in behind + later] == list(range(2, 9))
        assert batcher.expired == 0


async def test_a_backlog_the_batches_cannot_drain_in_time_is_shed_at_the_door() -> None:
    gate = Gate(asyncio.get_running_loop(), seconds=0.2)
    async with (
        MicroBatcher(gate, max_batch_size=2, max_delay=0, max_queue_delay=0.05) as batcher,
        gate,
    ):
        assert await batcher.submit(0) == 0  # a batch takes 0.2 s: 4 x the bound
        gate.open.clear()
        running = await submitted(batcher, 1)
        queued = [await submitted(batcher, 2), await submitted(batcher, 3)]
        with pytest.raises(Overloaded, match="would take about"):
            await batcher.submit(4)  # a full batch ahead of it: 0.2 s > 0.05 s
        gate.open.set()
        assert await running == 1
        assert [await f for f in queued] == [2, 3]


async def test_admitted_items_of_a_backlog_that_waited_too_long_are_shed_not_run() -> None:
    gate = Gate(asyncio.get_running_loop())
    async with (
        MicroBatcher(gate, max_batch_size=2, max_delay=0, max_queue_delay=0.02) as batcher,
        gate,
    ):
        gate.open.clear()  # no batch measured yet: nothing is shed at the door
        running = await submitted(batcher, 1)
        backlog = [await submitted(batcher, n) for n in range(2, 7)]  # more than one batch
        await asyncio.sleep(0.1)  # every queued item has waited beyond 2 x the bound
        gate.open.set()
        assert await running == 1
        for future in backlog:
            with pytest.raises(Overloaded, match="waited more than 40 ms"):
                await future
        assert batcher.expired == len(backlog)
        assert gate.batches == [[1]]  # none of them was computed


class GatedPipeline:
    """Holds every call until released; answers an empty feed, or fails past a deadline."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.deadlines: list[float | None] = []
        self.two_waiting = asyncio.Event()

    async def recommend(self, request: Request, deadline: float | None = None) -> Recommendation:
        self.deadlines.append(deadline)
        if len(self.deadlines) == 2:
            self.two_waiting.set()
        if deadline is not None and deadline < time.perf_counter() + 60:
            raise DeadlineExceeded(f"request {request.request_id}: deadline too close")
        await self.release.wait()
        empty = ScoredItems(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))
        return Recommendation(request.request_id, empty, "m", "i", "c")

    def versions(self) -> ServingVersions:
        return ServingVersions("i", "c", {"ranker": "m"})

    def control_from_last_good(self) -> frozenset[str]:
        return frozenset()

    async def close(self) -> None:
        self.release.set()


@asynccontextmanager
async def gated_server(
    settings: ServeSettings,
) -> AsyncIterator[tuple[RunningServer, GatedPipeline]]:
    pipeline = GatedPipeline()

    async def opener(_s: ServeSettings, _m: ServingMetrics) -> GatedPipeline:
        return pipeline

    running = await RunningServer.start(settings, opener)
    try:
        await running.wait_ready()
        yield running, pipeline
    finally:
        pipeline.release.set()
        await running.stop()


@pytest.fixture
async def gated(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, GatedPipeline]]:
    settings = ServeSettings(artifacts=tmp_path, port=0, metrics_port=0, max_in_flight=2)
    async with gated_server(settings) as running:
        yield running


async def test_beyond_max_in_flight_calls_get_resource_exhausted_at_once(
    gated: tuple[RunningServer, GatedPipeline],
) -> None:
    server, pipeline = gated
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        request = recommender_pb2.RecommendRequest(user_id="u")
        held = [asyncio.ensure_future(stub.Recommend(request)) for _ in range(2)]
        await pipeline.two_waiting.wait()
        with pytest.raises(grpc.aio.AioRpcError) as shed:
            await stub.Recommend(request)
        assert shed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "calls in flight" in (shed.value.details() or "")
        pipeline.release.set()
        for call in held:
            await call


async def test_beyond_max_concurrent_rpcs_grpc_answers_resource_exhausted_without_the_servicer(
    tmp_path: Path,
) -> None:
    settings = ServeSettings(
        artifacts=tmp_path, port=0, metrics_port=0, max_in_flight=0, max_concurrent_rpcs=2
    )
    async with (
        gated_server(settings) as (server, pipeline),
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        request = recommender_pb2.RecommendRequest(user_id="u")
        held = [asyncio.ensure_future(stub.Recommend(request)) for _ in range(2)]
        await pipeline.two_waiting.wait()
        with pytest.raises(grpc.aio.AioRpcError) as shed:
            await stub.Recommend(request, timeout=30)  # (the pipeline would say DEADLINE_EXCEEDED)
        assert shed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(pipeline.deadlines) == 2  # the extra call never reached the servicer
        pipeline.release.set()
        for call in held:
            await call
        await stub.Recommend(request)  # a slot is free again


async def test_calls_beyond_max_pending_rpcs_are_ended_by_grpc_core_while_the_loop_is_busy(
    tmp_path: Path,
) -> None:
    settings = ServeSettings(artifacts=tmp_path, port=0, metrics_port=0, max_pending_rpcs=1)
    async with gated_server(settings) as (server, pipeline):
        pipeline.release.set()
        # A synchronous channel: its calls are sent by gRPC's own threads, not by this loop.
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        request = recommender_pb2.RecommendRequest(user_id="u")
        try:
            calls = [stub.Recommend.future(request) for _ in range(10)]
            # Hold the event loop as a server busy with admitted work does: no call is taken
            # from gRPC core meanwhile, so the calls queue there until the core ends some.
            give_up = time.monotonic() + 10  # (gRPC core itself ends calls at 30 s)
            while not any(c.done() for c in calls) and time.monotonic() < give_up:
                time.sleep(0.01)  # noqa: ASYNC251 (holding the loop is the point)
            codes = await asyncio.to_thread(lambda: [c.code() for c in calls])
        finally:
            channel.close()
    assert grpc.StatusCode.CANCELLED in codes  # ended by the core while the loop was held
    assert grpc.StatusCode.OK in codes  # the ones it held were served once the loop was free


async def test_the_client_deadline_reaches_the_pipeline_and_maps_to_deadline_exceeded(
    gated: tuple[RunningServer, GatedPipeline],
) -> None:
    server, pipeline = gated
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        request = recommender_pb2.RecommendRequest(user_id="u")
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await stub.Recommend(request, timeout=5)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        (deadline,) = pipeline.deadlines
        assert deadline is not None
        # The server learns the deadline from the grpc-timeout header, which gRPC encodes rounded
        # up, so the remaining time it sees can exceed the client's 5 s by a little.
        assert 0 < deadline - time.perf_counter() <= 5.5
