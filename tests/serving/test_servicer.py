"""The Recommend servicer on real sockets: status codes, admission, deadlines, the response.

Most tests run a real :class:`RunningServer` with the toy pipeline or a scripted one (a small
real RecommendPipeline answering a fixed recommendation or raising a given error). Tests of the
servicer's own knobs (the clock, request ids, draining, the in-flight count) serve a
:class:`RecommenderService` built here on a real gRPC port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import numpy as np
import pytest

from recsys.serving.batching import DeadlineExceeded, Overloaded
from recsys.serving.exposure import ExposureSink, JsonlFileWriter
from recsys.serving.metrics import ServingMetrics
from recsys.serving.pipeline import RecommendPipeline
from recsys.serving.server import OpenPipeline, RunningServer
from recsys.serving.servicer import RecommenderService, add_to_server, local_hour
from recsys.serving.wire import response_bytes, to_response
from recsys.settings import ServeSettings
from recsys.types import (
    Encodings,
    Exposure,
    Recommendation,
    Request,
    ScoredItems,
    ServingVersions,
)
from recsys.v1 import recommender_pb2, recommender_pb2_grpc
from tests.serving.test_server import Client
from tests.serving.toy_pipeline import (
    FAILING_USER,
    HELD_USER,
    MODEL_VERSION,
    OVERLOADED_USER,
    ToyOpener,
    ToyPipeline,
    expected_sku_ids,
    toy_settings,
)

REQUESTS = "recsys_requests_total"

FULL = Recommendation(
    request_id="req-full",
    items=ScoredItems(
        sku_ids=np.array([42, 7, 1_000_000_000_123], dtype=np.int64),
        restaurant_ids=np.array([2, 0, 9_000_000_001], dtype=np.int64),
        scores=np.array([0.75, -0.5, 0.125], dtype=np.float32),
    ),
    model_version="model-7",
    index_version="index-3",
    config_version="config-9",
    exposures=(
        Exposure("retrieval", "retrieval-depth", "k400", 1234),
        Exposure("arrange", "restaurant-cap", "cap-3", 5, forced=True),
    ),
    degraded_reasons=("no location", "deadline: unranked"),
    stage_seconds=(("retrieve", 0.001), ("rank", 0.002)),
    snapshot_id="0123456789abcdef",
)
"""A recommendation with every field the response carries set to a telling value."""


class ScriptedPipeline:
    """A RecommendPipeline that answers ``answer`` under the caller's request id, or raises it
    when it is an exception; it records each request and deadline it was given."""

    def __init__(self, answer: Recommendation | Exception) -> None:
        self.answer = answer
        self.calls: list[tuple[Request, float | None]] = []
        self.closed = False

    async def recommend(self, request: Request, deadline: float | None = None) -> Recommendation:
        self.calls.append((request, deadline))
        if isinstance(self.answer, Exception):
            raise self.answer
        return replace(self.answer, request_id=request.request_id)

    def versions(self) -> ServingVersions:
        return ServingVersions("index-3", "config-9", {"ranker": "model-7"})

    def control_from_last_good(self) -> frozenset[str]:
        return frozenset()

    async def close(self) -> None:
        self.closed = True


def settings_for(tmp_path: Path, *, max_in_flight: int = 0) -> ServeSettings:
    return toy_settings(tmp_path, max_in_flight=max_in_flight)


@contextlib.asynccontextmanager
async def running(
    settings: ServeSettings,
    open_pipeline: OpenPipeline,
    *,
    ready: bool = True,
) -> AsyncIterator[tuple[RunningServer, Client]]:
    """A started RunningServer (ready unless told otherwise) and a client to it."""
    server = await RunningServer.start(settings, open_pipeline)
    client = Client(server)
    try:
        if ready:
            await server.wait_ready()
        yield server, client
    finally:
        await client.close()
        await server.stop()


def scripted(pipeline: ScriptedPipeline) -> OpenPipeline:
    async def opener(_settings: ServeSettings, _metrics: ServingMetrics) -> ScriptedPipeline:
        return pipeline

    return opener


def counted(metrics: ServingMetrics, code: str) -> float | None:
    return metrics.registry.get_sample_value(REQUESTS, {"code": code})


async def failure(call: Callable[[], Awaitable[object]]) -> grpc.aio.AioRpcError:
    """The error a call ends with (it must fail)."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call()
    return raised.value


@dataclass
class Standalone:
    """A RecommenderService on its own gRPC port, its metrics and exposure log."""

    service: RecommenderService
    stub: recommender_pb2_grpc.RecommenderAsyncStub
    metrics: ServingMetrics
    exposure_log: Path

    async def recommend(self, **fields: object) -> recommender_pb2.RecommendResponse:
        request = recommender_pb2.RecommendRequest(**fields)  # type: ignore[arg-type]
        return await self.stub.Recommend(request, timeout=30)

    def exposure_lines(self) -> list[dict[str, object]]:
        if not self.exposure_log.exists():
            return []
        return [json.loads(line) for line in self.exposure_log.read_text().splitlines()]


@contextlib.asynccontextmanager
async def standalone(
    tmp_path: Path,
    pipeline: RecommendPipeline | None,
    *,
    hour: Callable[[], int] = local_hour,
    make_request_id: Callable[[], str] = lambda: "generated-1",
    max_in_flight: int = 0,
) -> AsyncIterator[Standalone]:
    metrics = ServingMetrics()
    path = tmp_path / "standalone-exposures.jsonl"
    exposures = ExposureSink(JsonlFileWriter(path), observer=metrics)
    exposures.start()
    service = RecommenderService(
        metrics,
        exposures,
        hour=hour,
        make_request_id=make_request_id,
        max_in_flight=max_in_flight,
    )
    if pipeline is not None:
        service.attach(pipeline)
    server = grpc.aio.server()
    add_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub: recommender_pb2_grpc.RecommenderAsyncStub = recommender_pb2_grpc.RecommenderStub(channel)
    try:
        yield Standalone(service, stub, metrics, path)
    finally:
        await channel.close(None)
        await server.stop(None)
        await exposures.close()
        if pipeline is not None:
            await pipeline.close()


# to_response


def test_to_response_carries_every_field_of_a_recommendation() -> None:
    response = to_response(FULL)
    assert response.request_id == "req-full"
    assert response.model_version == "model-7"
    assert response.index_version == "index-3"
    assert response.config_version == "config-9"
    assert response.snapshot_id == "0123456789abcdef"
    assert [(e.layer, e.experiment, e.arm, e.bucket, e.forced) for e in response.experiments] == [
        ("retrieval", "retrieval-depth", "k400", 1234, False),
        ("arrange", "restaurant-cap", "cap-3", 5, True),
    ]
    assert response.degraded is True
    assert response.degraded_reason == "no location; deadline: unranked"
    assert [(i.sku_id, i.restaurant_id, i.score) for i in response.items] == [
        (42, 2, 0.75),
        (7, 0, -0.5),
        (1_000_000_000_123, 9_000_000_001, 0.125),
    ]


def test_to_response_of_a_plain_empty_recommendation_is_not_degraded_and_has_no_items() -> None:
    empty = ScoredItems(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))
    response = to_response(Recommendation("r", empty, "m", "i", "c"))
    assert response.request_id == "r"
    assert (response.model_version, response.index_version, response.config_version) == (
        "m",
        "i",
        "c",
    )
    assert list(response.items) == []
    assert list(response.experiments) == []
    assert response.degraded is False
    assert response.degraded_reason == ""
    assert response.snapshot_id == ""


def test_local_hour_is_the_hour_of_the_local_clock() -> None:
    before = time.localtime().tm_hour
    hour = local_hour()
    after = time.localtime().tm_hour
    assert hour in {before, after}
    assert 0 <= hour <= 23


def test_a_negative_max_in_flight_is_refused(tmp_path: Path) -> None:
    sink = ExposureSink(JsonlFileWriter(tmp_path / "unused.jsonl"))
    with pytest.raises(ValueError, match="max_in_flight is -1; expected >= 0"):
        RecommenderService(ServingMetrics(), sink, max_in_flight=-1)


# A real server: answers and status codes


async def test_the_answer_reaches_the_client_with_every_field_of_the_recommendation(
    tmp_path: Path,
) -> None:
    pipeline = ScriptedPipeline(FULL)
    async with running(settings_for(tmp_path), scripted(pipeline)) as (server, client):
        response = await client.recommend(user_id="ann", request_id="wire-1")
        assert response == to_response(replace(FULL, request_id="wire-1"))
        assert response.items[2].sku_id == 1_000_000_000_123
        (request, _deadline), *_ = pipeline.calls
        assert request.user_id == "ann"
        assert counted(server.metrics, "OK") == 1
        degraded = server.metrics.registry.get_sample_value
        # two toy reasons, neither a known one: both count under the short label "other"
        assert degraded("recsys_degraded_responses_total", {"reason": "other"}) == 2


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"user_id": "u", "request_id": "r" * 129}, "request_id"),
        ({"user_id": "u", "surface": "s" * 65}, "surface"),
        ({"user_id": "u", "platform": "p" * 65}, "platform"),
        ({"user_id": "é" * 65}, "user_id"),  # 130 bytes in UTF-8 although 65 characters
        ({"user_id": "u", "exclude_sku_ids": [1, 2, -7]}, "exclude_sku_ids[2]"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field_and_never_reaches_the_pipeline(
    tmp_path: Path, fields: dict[str, object], field: str
) -> None:
    pipeline = ScriptedPipeline(FULL)
    async with running(settings_for(tmp_path), scripted(pipeline)) as (server, client):
        error = await failure(lambda: client.recommend(**fields))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = error.details() or ""
        assert details.startswith(f"{field}: ")
        assert "expected" in details
        assert pipeline.calls == []
        assert counted(server.metrics, "INVALID_ARGUMENT") == 1
        assert counted(server.metrics, "OK") is None


async def test_while_the_pipeline_loads_calls_are_unavailable_but_bad_input_is_still_invalid(
    tmp_path: Path,
) -> None:
    gate = asyncio.Event()
    async with running(settings_for(tmp_path), ToyOpener(gate=gate), ready=False) as (
        server,
        client,
    ):
        loading = await failure(lambda: client.recommend(user_id="early"))
        assert loading.code() == grpc.StatusCode.UNAVAILABLE
        assert loading.details() == "the recommender is still loading; retry shortly"
        invalid = await failure(lambda: client.recommend(user_id=""))
        assert invalid.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert counted(server.metrics, "UNAVAILABLE") == 1
        assert counted(server.metrics, "INVALID_ARGUMENT") == 1
        gate.set()
        await server.wait_ready()
        response = await client.recommend(user_id="late", num_results=3)
        expected = expected_sku_ids(Request(request_id="", user_id="late", num_results=3))
        assert [item.sku_id for item in response.items] == expected.tolist()
        assert counted(server.metrics, "OK") == 1


async def test_an_overloaded_pipeline_is_resource_exhausted_naming_the_request_and_cause(
    tmp_path: Path,
) -> None:
    async with running(settings_for(tmp_path), ToyOpener()) as (server, client):
        error = await failure(lambda: client.recommend(user_id=OVERLOADED_USER, request_id="s-1"))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details() == "server overloaded, request_id=s-1: toy queue is full"
        assert counted(server.metrics, "RESOURCE_EXHAUSTED") == 1
        assert len((await client.recommend(user_id="next")).items) == 20


async def test_a_scripted_overloaded_error_is_resource_exhausted_with_its_message(
    tmp_path: Path,
) -> None:
    pipeline = ScriptedPipeline(Overloaded("the oldest item has waited 0.5 s"))
    async with running(settings_for(tmp_path), scripted(pipeline)) as (server, client):
        error = await failure(lambda: client.recommend(user_id="u", request_id="s-2"))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details() == (
            "server overloaded, request_id=s-2: the oldest item has waited 0.5 s"
        )
        assert len(pipeline.calls) == 1
        assert counted(server.metrics, "RESOURCE_EXHAUSTED") == 1


async def test_beyond_max_in_flight_a_call_is_shed_and_the_next_one_after_is_served(
    tmp_path: Path,
) -> None:
    opener = ToyOpener()
    async with running(settings_for(tmp_path, max_in_flight=1), opener) as (server, client):
        pipeline = opener.pipeline
        assert pipeline is not None
        held = asyncio.ensure_future(client.recommend(user_id=HELD_USER, request_id="held"))
        await pipeline.held.wait()
        shed = await failure(lambda: client.recommend(user_id="u", request_id="second"))
        assert shed.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert shed.details() == (
            "server overloaded, request_id=second: more than 1 calls in flight"
        )
        pipeline.release.set()
        assert (await held).request_id == "held"
        assert (await client.recommend(user_id="u", request_id="third")).request_id == "third"
        assert counted(server.metrics, "RESOURCE_EXHAUSTED") == 1
        assert counted(server.metrics, "OK") == 2


async def test_a_pipeline_deadline_exceeded_is_deadline_exceeded_with_its_message(
    tmp_path: Path,
) -> None:
    pipeline = ScriptedPipeline(DeadlineExceeded("request d-1: the deadline passed in the queue"))
    async with running(settings_for(tmp_path), scripted(pipeline)) as (server, client):
        sent = time.perf_counter()
        error = await failure(
            lambda: client.recommender.Recommend(
                recommender_pb2.RecommendRequest(user_id="u", request_id="d-1"), timeout=20
            )
        )
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # the server's message, not the client's own "Deadline Exceeded"
        assert error.details() == "request d-1: the deadline passed in the queue"
        ((_request, deadline),) = pipeline.calls
        assert deadline is not None
        # the client's 20 s, on the server's perf_counter clock (the wire rounds a little)
        assert abs(deadline - (sent + 20)) < 1
        assert counted(server.metrics, "DEADLINE_EXCEEDED") == 1


async def test_a_call_without_a_client_deadline_gives_the_pipeline_none(tmp_path: Path) -> None:
    pipeline = ScriptedPipeline(FULL)
    async with running(settings_for(tmp_path), scripted(pipeline)) as (_server, client):
        await client.recommender.Recommend(recommender_pb2.RecommendRequest(user_id="u"))
        ((_request, deadline),) = pipeline.calls
        assert deadline is None


async def test_an_unexpected_pipeline_error_is_internal_without_its_message_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline = ScriptedPipeline(KeyError("secret-column-name"))
    async with running(settings_for(tmp_path), scripted(pipeline)) as (server, client):
        with caplog.at_level(logging.ERROR, logger="recsys.serving.servicer"):
            error = await failure(lambda: client.recommend(user_id="u", request_id="i-1"))
        assert error.code() == grpc.StatusCode.INTERNAL
        assert error.details() == "internal error, request_id=i-1"
        assert "secret-column-name" not in (error.details() or "")
        (record,) = [r for r in caplog.records if r.name == "recsys.serving.servicer"]
        assert record.getMessage() == "Recommend failed, request_id=i-1"
        assert record.exc_info is not None
        assert isinstance(record.exc_info[1], KeyError)
        assert counted(server.metrics, "INTERNAL") == 1


async def test_a_toy_ranking_failure_is_internal_and_the_server_keeps_serving(
    tmp_path: Path,
) -> None:
    async with running(settings_for(tmp_path), ToyOpener()) as (server, client):
        error = await failure(lambda: client.recommend(user_id=FAILING_USER, request_id="i-2"))
        assert error.code() == grpc.StatusCode.INTERNAL
        assert error.details() == "internal error, request_id=i-2"
        response = await client.recommend(user_id="after")
        assert response.model_version == MODEL_VERSION
        assert len(response.items) == 20
        assert counted(server.metrics, "INTERNAL") == 1
        assert counted(server.metrics, "OK") == 1
        in_flight = server.metrics.registry.get_sample_value("recsys_requests_in_flight")
        assert in_flight == 0


# The servicer's own knobs, served on a port of its own


async def test_the_servicer_hands_the_pipeline_its_clock_hour_and_a_generated_request_id(
    tmp_path: Path,
) -> None:
    pipeline = ScriptedPipeline(FULL)
    async with standalone(tmp_path, pipeline, hour=lambda: 7) as served:
        response = await served.recommend(user_id="carol")
        assert response.request_id == "generated-1"
        ((request, _deadline),) = pipeline.calls
        assert request == Request(
            request_id="generated-1", user_id="carol", num_results=20, surface="home", hour=7
        )


async def test_a_clock_hour_out_of_range_is_invalid_argument_naming_hour(tmp_path: Path) -> None:
    pipeline = ScriptedPipeline(FULL)
    async with standalone(tmp_path, pipeline, hour=lambda: 24) as served:
        error = await failure(lambda: served.recommend(user_id="u"))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details() == "hour: is 24; expected 0..23"
        assert pipeline.calls == []


async def test_a_failure_before_the_pipeline_call_is_still_one_clean_internal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_clock() -> int:
        raise RuntimeError("clock source gone")

    pipeline = ScriptedPipeline(FULL)
    async with standalone(tmp_path, pipeline, hour=broken_clock) as served:
        with caplog.at_level(logging.ERROR, logger="recsys.serving.servicer"):
            error = await failure(lambda: served.recommend(user_id="u", request_id="c-1"))
            anonymous = await failure(lambda: served.recommend(user_id="u"))
        assert error.code() == grpc.StatusCode.INTERNAL
        assert error.details() == "internal error, request_id=c-1"
        assert anonymous.code() == grpc.StatusCode.INTERNAL
        assert anonymous.details() == "internal error, request_id=(none)"
        messages = [r.getMessage() for r in caplog.records if r.name == "recsys.serving.servicer"]
        assert messages == [
            "Recommend failed, request_id=c-1",
            "Recommend failed, request_id=(none)",
        ]
        assert pipeline.calls == []
        assert counted(served.metrics, "INTERNAL") == 2
        assert served.service.in_flight == 0


async def test_an_internal_error_names_the_generated_request_id(tmp_path: Path) -> None:
    pipeline = ScriptedPipeline(RuntimeError("boom"))
    async with standalone(tmp_path, pipeline, make_request_id=lambda: "gen-77") as served:
        error = await failure(lambda: served.recommend(user_id="u"))
        assert error.code() == grpc.StatusCode.INTERNAL
        assert error.details() == "internal error, request_id=gen-77"


async def test_an_unattached_servicer_is_unavailable_until_a_pipeline_is_attached(
    tmp_path: Path,
) -> None:
    async with standalone(tmp_path, None) as served:
        error = await failure(lambda: served.recommend(user_id="u"))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert error.details() == "the recommender is still loading; retry shortly"
        pipeline = ScriptedPipeline(FULL)
        served.service.attach(pipeline)
        model_info = served.metrics.registry.get_sample_value(
            "recsys_model_info", {"name": "ranker", "version": "model-7"}
        )
        assert model_info == 1
        assert (await served.recommend(user_id="u", request_id="x")).request_id == "x"
        assert counted(served.metrics, "UNAVAILABLE") == 1
        assert counted(served.metrics, "OK") == 1
        await pipeline.close()


async def test_a_draining_servicer_refuses_new_calls_and_finishes_the_running_one(
    tmp_path: Path,
) -> None:
    metrics = ServingMetrics()
    pipeline = ToyPipeline(metrics, batch_max_size=8, batch_max_delay_ms=1.0)
    async with standalone(tmp_path, pipeline) as served:
        held = asyncio.ensure_future(served.recommend(user_id=HELD_USER, request_id="held"))
        await pipeline.held.wait()
        assert served.service.in_flight == 1
        assert served.metrics.registry.get_sample_value("recsys_requests_in_flight") == 1
        idle = asyncio.ensure_future(served.service.wait_idle())
        served.service.start_draining()
        refused = await failure(lambda: served.recommend(user_id="u"))
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
        assert refused.details() == "the server is shutting down; retry"
        assert not idle.done()
        pipeline.release.set()
        response = await held
        assert response.request_id == "held"
        assert len(response.items) == 20
        await idle
        assert served.service.in_flight == 0
        assert served.metrics.registry.get_sample_value("recsys_requests_in_flight") == 0
        assert counted(served.metrics, "UNAVAILABLE") == 1
        assert counted(served.metrics, "OK") == 1


async def test_only_answered_calls_reach_the_exposure_log(tmp_path: Path) -> None:
    pipeline = ScriptedPipeline(FULL)
    async with standalone(tmp_path, pipeline, hour=lambda: 19) as served:
        await served.recommend(user_id="dana", request_id="e-1")
        pipeline.answer = RuntimeError("later calls fail")
        await failure(lambda: served.recommend(user_id="dana", request_id="e-2"))
        await failure(lambda: served.recommend(user_id="", request_id="e-3"))
    # the sink has been closed: everything queued is written
    written = served.metrics.registry.get_sample_value("recsys_exposure_records_written_total")
    assert written == 1
    (line,) = served.exposure_lines()
    assert line["request_id"] == "e-1"
    assert line["user_id"] == "dana"
    assert line["hour"] == 19
    assert line["model_version"] == "model-7"
    assert line["snapshot_id"] == "0123456789abcdef"
    assert line["sku_ids"] == [42, 7, 1_000_000_000_123]


@pytest.mark.parametrize("request_id", ["r", "x" * 127, "y" * 128, "zäöü-ñ-€" * 10, ""])
def test_response_bytes_are_the_serialized_response_with_each_answers_own_request_id(
    request_id: str,
) -> None:
    """A computed answer is serialized once; each response sharing it (its cache hits) prefixes
    its own request id: byte for byte what serializing the whole response gives."""
    answer = replace(FULL, encodings=Encodings())
    assert response_bytes(answer) == to_response(FULL).SerializeToString()
    shared = answer.encodings
    assert shared is not None
    assert shared.response is not None
    hit = replace(answer, request_id=request_id, cached=True)
    expected = to_response(replace(FULL, request_id=request_id)).SerializeToString()
    assert response_bytes(hit) == expected
    assert recommender_pb2.RecommendResponse.FromString(response_bytes(hit)).request_id == (
        request_id
    )
    assert response_bytes(replace(FULL, request_id=request_id)) == expected  # no Encodings
