"""The health port: answered while the main port sheds load, NOT_SERVING through the drain."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.serving.server import RECOMMENDER_SERVICE, BindError
from recsys.settings import ServeSettings
from recsys.v1 import recommender_pb2, recommender_pb2_grpc
from tests.serving.test_admission import gated_server

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def check(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=RECOMMENDER_SERVICE))
        return int(reply.status)


async def test_the_health_port_answers_while_the_main_port_refuses_calls(tmp_path: Path) -> None:
    settings = ServeSettings(
        artifacts=tmp_path,
        port=0,
        metrics_port=0,
        health_port=0,
        max_in_flight=0,
        max_concurrent_rpcs=2,
        drain_seconds=120,
    )
    async with (
        gated_server(settings) as (server, pipeline),
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        assert server.health_port is not None
        assert server.health_port != server.port
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        request = recommender_pb2.RecommendRequest(user_id="u")
        held = [asyncio.ensure_future(stub.Recommend(request)) for _ in range(2)]
        await pipeline.two_waiting.wait()  # both slots taken
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # the main port's health check
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=RECOMMENDER_SERVICE)
            )
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await check(server.health_port) == SERVING

        # Stopping: the held call keeps the drain going; the health port says NOT_SERVING.
        stopping = asyncio.ensure_future(server.stop())
        assert await check(server.health_port) == NOT_SERVING
        assert not stopping.done()
        pipeline.release.set()
        for call in held:
            await call
        await stopping
        with pytest.raises(grpc.aio.AioRpcError) as gone:  # closed with the server
            await check(server.health_port)
        assert gone.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_health_port_in_use_is_a_bind_error_naming_it(tmp_path: Path) -> None:
    async with gated_server(ServeSettings(artifacts=tmp_path, port=0, metrics_port=0)) as (
        taken,
        _pipeline,
    ):
        settings = ServeSettings(artifacts=tmp_path, port=0, metrics_port=0, health_port=taken.port)
        with pytest.raises(BindError) as failed:
            async with gated_server(settings):
                pass
        assert failed.value.option == "--health-port"
        assert failed.value.reason == "address already in use"
