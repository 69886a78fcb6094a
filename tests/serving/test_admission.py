"""Admission control: shed at once beyond the bounds, honour client deadlines (real sockets)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
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


async def test_the_batcher_sheds_new_items_once_the_oldest_waited_too_long() -> None:
    gate = asyncio.Event()
    loop = asyncio.get_running_loop()

    def blocked(items: list[int]) -> list[int]:
        asyncio.run_coroutine_threadsafe(gate.wait(), loop).result()
        return items

    async with MicroBatcher(blocked, max_delay=0, max_queue_delay=0.01) as batcher:
        running = asyncio.ensure_future(batcher.submit(1))  # occupies the only batch slot
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(batcher.submit(2))  # waits behind it
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded, match="oldest item has waited"):
            await batcher.submit(3)
        gate.set()
        assert await running == 1
        assert await queued == 2


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

    async def close(self) -> None:
        self.release.set()


@pytest.fixture
async def gated(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, GatedPipeline]]:
    pipeline = GatedPipeline()

    async def opener(_s: ServeSettings, _m: ServingMetrics) -> GatedPipeline:
        return pipeline

    settings = ServeSettings(artifacts=tmp_path, port=0, metrics_port=0, max_in_flight=2)
    running = await RunningServer.start(settings, opener)
    await running.wait_ready()
    yield running, pipeline
    pipeline.release.set()
    await running.stop()


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
        assert 0 < deadline - time.perf_counter() <= 5
