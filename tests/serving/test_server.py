"""The real server on real sockets: gRPC, health, reflection, metrics over HTTP, exposure log."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from recsys.artifacts import ArtifactError
from recsys.serving.client import build_request, recommend
from recsys.serving.exposure import JsonlFileWriter, iter_exposure_lines
from recsys.serving.server import RECOMMENDER_SERVICE, RunningServer
from recsys.settings import ServeSettings
from recsys.types import Request
from recsys.v1 import recommender_pb2, recommender_pb2_grpc
from tests.serving.metrics_page import fetch_metrics
from tests.serving.test_exposure import GatedWriter
from tests.serving.toy_pipeline import (
    CONFIG_VERSION,
    FAILING_USER,
    HELD_USER,
    INDEX_VERSION,
    MODEL_VERSION,
    OVERLOADED_USER,
    ToyOpener,
    ToyPipeline,
    expected_sku_ids,
    toy_settings,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def settings(tmp_path: Path) -> ServeSettings:
    return toy_settings(tmp_path)


class Client:
    """A real grpc.aio channel to a running server."""

    def __init__(self, server: RunningServer) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        self.recommender: recommender_pb2_grpc.RecommenderAsyncStub = (
            recommender_pb2_grpc.RecommenderStub(self.channel)
        )
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def recommend(self, **fields: object) -> recommender_pb2.RecommendResponse:
        request = recommender_pb2.RecommendRequest(**fields)  # type: ignore[arg-type]
        return await self.recommender.Recommend(request, timeout=30)

    async def status(self, service: str = "") -> int:
        request = health_pb2.HealthCheckRequest(service=service)
        response = await self.health.Check(request, timeout=30)
        return int(response.status)

    async def close(self) -> None:
        await self.channel.close(None)


@pytest.fixture
async def opener() -> ToyOpener:
    return ToyOpener()


@pytest.fixture
async def server(settings: ServeSettings, opener: ToyOpener) -> AsyncIterator[RunningServer]:
    running = await RunningServer.start(settings, opener)
    await running.wait_ready()
    yield running
    await running.stop()


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[Client]:
    c = Client(server)
    yield c
    await c.close()


def pipeline_of(opener: ToyOpener) -> ToyPipeline:
    assert opener.pipeline is not None
    return opener.pipeline


def exposure_lines(directory: Path) -> list[dict[str, object]]:
    return [record for _, _, record in iter_exposure_lines(directory)]


async def test_a_good_call(client: Client) -> None:
    response = await client.recommend(
        user_id="alice",
        num_results=7,
        location=recommender_pb2.Location(lat=52.5, lon=13.4),
        exclude_sku_ids=[1, 2],
    )
    expected = expected_sku_ids(
        Request(request_id="", user_id="alice", num_results=7, exclude_sku_ids=(1, 2))
    )
    assert [item.sku_id for item in response.items] == expected.tolist()
    assert [item.restaurant_id for item in response.items] == (expected // 20).tolist()
    scores = np.array([item.score for item in response.items])
    assert (np.diff(scores) < 0).all()
    assert len(response.request_id) == 32  # generated
    assert response.model_version == MODEL_VERSION
    assert response.index_version == INDEX_VERSION
    assert response.config_version == CONFIG_VERSION
    assert [e.layer for e in response.experiments] == ["feed"]
    assert response.experiments[0].arm in {"control", "treatment"}
    assert not response.degraded


async def test_defaults_and_degraded_responses(client: Client) -> None:
    response = await client.recommend(user_id="bob", request_id="given-id")
    assert len(response.items) == 20
    assert response.request_id == "given-id"
    assert response.degraded
    assert response.degraded_reason == "no location"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"user_id": ""}, "user_id"),
        ({"user_id": "u" * 129}, "user_id"),
        ({"user_id": "u", "num_results": -1}, "num_results"),
        ({"user_id": "u", "num_results": 201}, "num_results"),
        ({"user_id": "u", "location": recommender_pb2.Location(lat=91, lon=0)}, "location.lat"),
        ({"user_id": "u", "location": recommender_pb2.Location(lat=0, lon=181)}, "location.lon"),
        (
            {"user_id": "u", "location": recommender_pb2.Location(lat=float("nan"), lon=0)},
            "location.lat",
        ),
        ({"user_id": "u", "exclude_sku_ids": [3, -1]}, "exclude_sku_ids[1]"),
        ({"user_id": "u", "exclude_sku_ids": list(range(1001))}, "exclude_sku_ids"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    client: Client, server: RunningServer, fields: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.recommend(**fields)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = raised.value.details() or ""
    assert details.startswith(f"{field}: ")
    assert "expected" in details
    counted = server.metrics.registry.get_sample_value(
        "recsys_requests_total", {"code": "INVALID_ARGUMENT"}
    )
    assert counted == 1


async def test_a_pipeline_exception_is_internal_with_the_request_id_logged_once(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR), pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.recommend(user_id=FAILING_USER, request_id="req-42")
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert "req-42" in (raised.value.details() or "")
    assert "toy ranking failed" not in (raised.value.details() or "")  # no internals leak
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "req-42" in errors[0].getMessage()
    assert errors[0].exc_info is not None
    # the server keeps serving
    assert len((await client.recommend(user_id="after")).items) == 20


async def test_an_overloaded_pipeline_is_resource_exhausted(client: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.recommend(user_id=OVERLOADED_USER)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_health_is_not_serving_until_the_pipeline_opens(settings: ServeSettings) -> None:
    gate = asyncio.Event()
    running = await RunningServer.start(settings, ToyOpener(gate=gate))
    client = Client(running)
    try:
        assert await client.status("") == NOT_SERVING
        assert await client.status(RECOMMENDER_SERVICE) == NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.recommend(user_id="early")
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "loading" in (raised.value.details() or "")
        gate.set()
        await running.wait_ready()
        assert await client.status("") == SERVING
        assert await client.status(RECOMMENDER_SERVICE) == SERVING
        assert len((await client.recommend(user_id="late")).items) == 20
    finally:
        await client.close()
        await running.stop()


async def test_a_pipeline_that_fails_to_open_leaves_health_not_serving(
    settings: ServeSettings,
) -> None:
    running = await RunningServer.start(settings, ToyOpener(error=ArtifactError("no index")))
    client = Client(running)
    try:
        with pytest.raises(ArtifactError, match="no index"):
            await running.wait_ready()
        assert await client.status(RECOMMENDER_SERVICE) == NOT_SERVING
    finally:
        await client.close()
        await running.stop()


async def test_reflection_lists_and_describes_the_service(client: Client) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=RECOMMENDER_SERVICE),
    ]
    responses = [r async for r in stub.ServerReflectionInfo(iter(requests), timeout=30)]
    services = {s.name for s in responses[0].list_services_response.service}
    assert {"recsys.v1.Recommender", "grpc.health.v1.Health"} <= services
    assert responses[1].file_descriptor_response.file_descriptor_proto


async def test_the_metrics_endpoint_has_the_recsys_series(
    client: Client, server: RunningServer
) -> None:
    for n in range(3):
        await client.recommend(user_id=f"user-{n}")
    with pytest.raises(grpc.aio.AioRpcError):
        await client.recommend(user_id="")
    text = await asyncio.to_thread(fetch_metrics, server.metrics_port)
    for series in (
        'recsys_requests_total{code="OK"} 3.0',
        'recsys_requests_total{code="INVALID_ARGUMENT"} 1.0',
        "recsys_request_duration_seconds_count 4.0",
        'recsys_stage_duration_seconds_count{stage="rank"} 3.0',
        "recsys_requests_in_flight 0.0",
        f'recsys_model_info{{name="ranker",version="{MODEL_VERSION}"}} 1.0',
        f'recsys_index_info{{version="{INDEX_VERSION}"}} 1.0',
        f'recsys_config_info{{version="{CONFIG_VERSION}"}} 1.0',
        'recsys_degraded_responses_total{reason="other"} 3.0',  # a toy reason
        'recsys_batch_size_bucket{batcher="toy",le="+Inf"}',
        'recsys_batch_queue_delay_seconds_count{batcher="toy"} 3.0',
        "recsys_exposure_records_written_total",
        "recsys_exposure_records_dropped_total 0.0",
        'recsys_experiment_exposures_total{arm="',
        f'recsys_live_score_bucket{{le="+Inf",model_version="{MODEL_VERSION}"}} 60.0',
        'recsys_control_plane_connected{document="experiments"} 1.0',
        "# TYPE recsys_control_rejected_documents_total counter",
    ):
        assert series in text, series


async def test_exposure_lines_are_flushed_on_shutdown(settings: ServeSettings) -> None:
    running = await RunningServer.start(settings, ToyOpener())
    await running.wait_ready()
    client = Client(running)
    ids = [f"req-{n}" for n in range(12)]
    await asyncio.gather(
        *(client.recommend(user_id=f"u{n}", request_id=i) for n, i in enumerate(ids))
    )
    await client.close()
    await running.stop()
    lines = exposure_lines(settings.exposure_path)
    assert sorted(str(line["request_id"]) for line in lines) == sorted(ids)
    assert all(line["model_version"] == MODEL_VERSION for line in lines)
    assert running.metrics.registry.get_sample_value("recsys_exposure_records_written_total") == 12


async def test_a_slow_exposure_sink_drops_and_counts_without_slowing_requests(
    settings: ServeSettings, tmp_path: Path
) -> None:
    writer = GatedWriter(JsonlFileWriter(tmp_path / "slow.jsonl"))
    settings = replace(settings, exposure_queue_size=2)
    running = await RunningServer.start(settings, ToyOpener(), exposure_writer=writer)
    await running.wait_ready()
    client = Client(running)
    try:
        await client.recommend(user_id="first")
        await asyncio.to_thread(writer.entered.wait)  # the writer thread is now stuck
        for n in range(8):  # every call completes although nothing can be written
            assert len((await client.recommend(user_id=f"u{n}")).items) == 20
        value = running.metrics.registry.get_sample_value
        assert value("recsys_exposure_records_dropped_total") == 6
    finally:
        writer.gate.set()
        await client.close()
        await running.stop()
    assert value("recsys_exposure_records_written_total") == 3
    assert len((tmp_path / "slow.jsonl").read_text().splitlines()) == 3


async def test_graceful_stop_finishes_the_in_flight_call(
    settings: ServeSettings, opener: ToyOpener
) -> None:
    running = await RunningServer.start(settings, opener)
    await running.wait_ready()
    client = Client(running)
    pipeline = pipeline_of(opener)
    in_flight = asyncio.ensure_future(client.recommend(user_id=HELD_USER, request_id="held"))
    await pipeline.held.wait()
    watch = client.health.Watch(health_pb2.HealthCheckRequest(service=RECOMMENDER_SERVICE))
    assert (await watch.read()).status == SERVING
    stopping = asyncio.ensure_future(running.stop())
    assert (await watch.read()).status == NOT_SERVING  # pushed as the drain begins
    watch.cancel()
    assert await client.status("") == NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.recommend(user_id="too-late")
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not stopping.done()
    pipeline.release.set()
    response = await in_flight
    assert response.request_id == "held"
    assert len(response.items) == 20
    await stopping
    await client.close()
    assert pipeline.closed
    assert [line["request_id"] for line in exposure_lines(settings.exposure_path)] == ["held"]


async def test_a_call_still_running_after_the_drain_period_is_unavailable(
    settings: ServeSettings, opener: ToyOpener
) -> None:
    running = await RunningServer.start(replace(settings, drain_seconds=0.2), opener)
    await running.wait_ready()
    client = Client(running)
    in_flight = asyncio.ensure_future(client.recommend(user_id=HELD_USER))
    await pipeline_of(opener).held.wait()
    await running.stop()  # returns although the held call never finishes by itself
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await in_flight
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE  # clients retry; never CANCELLED
    await client.close()
    assert pipeline_of(opener).closed


async def test_calls_queued_when_the_stop_begins_are_answered_never_cancelled(
    settings: ServeSettings, opener: ToyOpener
) -> None:
    running = await RunningServer.start(settings, opener)
    await running.wait_ready()
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")  # its own threads send
    stub = recommender_pb2_grpc.RecommenderStub(channel)
    calls = [
        stub.Recommend.future(recommender_pb2.RecommendRequest(user_id=f"u{i}"), timeout=30)
        for i in range(24)
    ]
    # Hold the event loop so the calls reach gRPC but no handler: gRPC queues them, as it does
    # on a loaded machine, and the stop begins while they are still queued.
    time.sleep(2.0)  # noqa: ASYNC251 -- blocking the loop is the point
    await running.stop()
    codes = Counter(call.code() for call in calls)  # each call has finished: the server is gone
    channel.close()
    assert grpc.StatusCode.CANCELLED not in codes, codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes


SERVE_SCRIPT = """
import asyncio, logging, sys
from pathlib import Path
from recsys.settings import ServeSettings
from recsys.serving.server import run
from tests.serving.toy_pipeline import open_toy

async def opener(settings, metrics):
    print("loop:", type(asyncio.get_running_loop()).__module__, file=sys.stderr, flush=True)
    return await open_toy(settings, metrics)

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
root = Path(sys.argv[1])
run(ServeSettings(artifacts=root, port=0, metrics_port=0, exposure_dir=root / "exposures"), opener)
"""


def test_serve_runs_on_uvloop_and_exits_0_on_sigterm_after_flushing(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT, str(tmp_path)],
        cwd=Path(__file__).resolve().parents[2],
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        watchdog = threading.Timer(120, process.kill)  # never hang the suite
        watchdog.start()
        try:
            assert process.stderr is not None
            seen: list[str] = []
            for line in process.stderr:
                seen.append(line)
                if "recsys serving on" in line:
                    break
            assert any("loop: uvloop" in line for line in seen), seen
            port = int(seen[-1].rsplit(":", 1)[1])
            request = build_request("carol", num_results=5, request_id="from-subprocess-test")
            response = recommend(f"127.0.0.1:{port}", request, timeout=30)
            assert len(response.items) == 5
            process.send_signal(signal.SIGTERM)
            rest = process.stderr.read()
            assert process.wait() == 0, rest
        finally:
            watchdog.cancel()
            process.kill()
    assert "recsys stopped" in rest
    lines = exposure_lines(tmp_path / "exposures")
    assert [line["request_id"] for line in lines] == ["from-subprocess-test"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_a_port_in_use_fails_the_start_and_releases_the_metrics_port(
    server: RunningServer, settings: ServeSettings
) -> None:
    metrics_port = free_port()
    taken = replace(settings, port=server.port, metrics_port=metrics_port)
    with pytest.raises(RuntimeError, match=str(server.port)):
        await RunningServer.start(taken, ToyOpener())
    with socket.socket() as again:  # the failed start closed its metrics endpoint
        again.bind(("127.0.0.1", metrics_port))
