"""Faults at the edges of the real server: bytes that are not a request, and shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import TypeAlias

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.serving.server import RECOMMENDER_SERVICE, RunningServer, serve
from recsys.settings import ServeSettings
from recsys.v1 import recommender_pb2_grpc
from tests.serving.test_server import Client, free_port
from tests.serving.toy_pipeline import HELD_USER, ToyOpener, ToyPipeline, toy_settings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
RECOMMEND = "/recsys.v1.Recommender/Recommend"


@pytest.fixture
def settings(tmp_path: Path) -> ServeSettings:
    return toy_settings(tmp_path, shutdown_grace_seconds=0.0)


def pipeline_of(opener: ToyOpener) -> ToyPipeline:
    assert opener.pipeline is not None
    return opener.pipeline


@pytest.fixture
async def opener() -> ToyOpener:
    return ToyOpener()


class PortClient(Client):
    """A client for a port known before the server starts."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.recommender = recommender_pb2_grpc.RecommenderStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)


async def code_of_a_new_call(client: Client) -> grpc.StatusCode:
    try:
        await client.recommend(user_id="probe")
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def eventually_unavailable(client: Client) -> None:
    """Return once a new Recommend call is refused (the drain has begun)."""
    for _ in range(1000):
        code = await code_of_a_new_call(client)
        if code != grpc.StatusCode.OK:
            break
        await asyncio.sleep(0.02)
    assert code == grpc.StatusCode.UNAVAILABLE


HealthWatch: TypeAlias = grpc.aio.UnaryStreamCall[
    health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
]


async def watch_until(client: Client, status: int) -> HealthWatch:
    """A health Watch of the Recommender service, read until it reports ``status``."""
    request = health_pb2.HealthCheckRequest(service=RECOMMENDER_SERVICE)
    watch: HealthWatch = client.health.Watch(request, wait_for_ready=True, timeout=60)
    async with asyncio.timeout(20):
        while await next_status(watch) != status:
            pass
    return watch


async def next_status(watch: HealthWatch) -> int:
    response = await watch.read()
    assert isinstance(response, health_pb2.HealthCheckResponse)
    return int(response.status)


async def test_garbage_bytes_are_invalid_argument_counted_and_logged_once_without_traceback(
    settings: ServeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    running = await RunningServer.start(settings, ToyOpener())
    await running.wait_ready()
    client = Client(running)
    raw = client.channel.unary_unary(RECOMMEND, request_serializer=None, response_deserializer=None)
    try:
        with caplog.at_level(logging.INFO):
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await raw(b"\xff\xff\xff", timeout=30)
                assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert raised.value.details() == "request: not a valid RecommendRequest message"
        counted = running.metrics.registry.get_sample_value(
            "recsys_requests_total", {"code": "INVALID_ARGUMENT"}
        )
        assert counted == 3
        about = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(about) == 1, [r.getMessage() for r in about]  # rate-limited
        assert about[0].levelno == logging.WARNING
        assert about[0].exc_info is None
        # a well-formed call on the same channel still works
        assert len((await client.recommend(user_id="after")).items) == 20
    finally:
        await client.close()
        await running.stop()


async def test_during_the_shutdown_grace_health_is_not_serving_and_calls_still_succeed(
    settings: ServeSettings, opener: ToyOpener
) -> None:
    running = await RunningServer.start(settings, opener)
    await running.wait_ready()
    client = Client(running)
    try:
        watch = await watch_until(client, SERVING)
        stopping = asyncio.ensure_future(running.stop(grace_seconds=2.0))
        assert await next_status(watch) == NOT_SERVING
        watch.cancel()
        assert await client.status("") == NOT_SERVING
        response = await client.recommend(user_id="during-grace", request_id="graced")
        assert response.request_id == "graced"
        assert len(response.items) == 20
        # a call that starts in the grace and is still in flight when the drain starts
        in_flight = asyncio.ensure_future(client.recommend(user_id=HELD_USER, request_id="held"))
        await pipeline_of(opener).held.wait()
        await eventually_unavailable(client)
        assert not stopping.done()
        pipeline_of(opener).release.set()
        held = await in_flight
        assert held.request_id == "held"
        assert len(held.items) == 20
        await stopping
    finally:
        await client.close()
        await running.stop()


async def test_a_call_still_running_when_the_drain_ends_is_unavailable_not_cancelled(
    settings: ServeSettings, opener: ToyOpener
) -> None:
    running = await RunningServer.start(replace(settings, drain_seconds=0.2), opener)
    await running.wait_ready()
    client = Client(running)
    try:
        in_flight = asyncio.ensure_future(client.recommend(user_id=HELD_USER))
        await pipeline_of(opener).held.wait()
        await running.stop()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await in_flight
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        counted = running.metrics.registry.get_sample_value
        assert counted("recsys_requests_total", {"code": "UNAVAILABLE"}) == 1
        assert counted("recsys_requests_total", {"code": "CANCELLED"}) is None
    finally:
        await client.close()


async def test_sigterm_goes_not_serving_and_keeps_serving_for_the_grace(
    settings: ServeSettings, opener: ToyOpener
) -> None:
    settings = replace(settings, port=free_port(), shutdown_grace_seconds=2.0)
    serving = asyncio.ensure_future(serve(settings, opener))
    stub = PortClient(settings.port)
    try:
        watch = await watch_until(stub, SERVING)
        # serve() installs its handler before the pipeline can open, so SIGTERM is caught
        os.kill(os.getpid(), signal.SIGTERM)
        assert await next_status(watch) == NOT_SERVING
        watch.cancel()
        assert not serving.done()
        assert len((await stub.recommend(user_id="after-sigterm")).items) == 20
        async with asyncio.timeout(20):
            await serving
    finally:
        await stub.close()
        if not serving.done():
            serving.cancel()
