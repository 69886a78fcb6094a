"""The whole product over a real socket: a built world, the real pipeline, the real server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.build import BuildReport
from recsys.control.backends import open_store
from recsys.geo import haversine_km
from recsys.serving.exposure import iter_exposure_lines
from recsys.serving.pipeline import open_pipeline
from recsys.serving.server import RunningServer
from recsys.settings import ServeSettings, default_exposure_dir
from recsys.v1 import recommender_pb2, recommender_pb2_grpc
from recsys.world import load_world
from tests.serving.metrics_page import fetch_metrics

KNOWN_USER = "user-0000001"


@pytest.fixture
async def server(artifacts: Path) -> AsyncIterator[RunningServer]:
    settings = ServeSettings(
        artifacts=artifacts, port=0, metrics_port=0, control_poll_seconds=0.05, drain_seconds=2
    )
    running = await RunningServer.start(settings, open_pipeline)
    await running.wait_ready()
    yield running
    await running.stop()


@pytest.fixture
async def stub(server: RunningServer) -> AsyncIterator[recommender_pb2_grpc.RecommenderAsyncStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield recommender_pb2_grpc.RecommenderStub(channel)  # an AsyncStub on an aio channel


def _request(**fields: object) -> recommender_pb2.RecommendRequest:
    return recommender_pb2.RecommendRequest(**fields)  # type: ignore[arg-type]


async def test_health_is_serving_once_loaded(server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="recsys.v1.Recommender")
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_known_user_gets_a_ranked_feed_that_names_its_versions(
    stub: recommender_pb2_grpc.RecommenderAsyncStub,
    built_world: tuple[Path, BuildReport],
    artifacts: Path,
) -> None:
    report = built_world[1]
    reply = await stub.Recommend(_request(user_id=KNOWN_USER, num_results=30, request_id="r-1"))
    assert reply.request_id == "r-1"
    assert len(reply.items) == 30
    assert not reply.degraded
    assert reply.model_version == report.model_version
    assert reply.index_version == report.index_version
    assert reply.config_version == "1"
    skus = [i.sku_id for i in reply.items]
    assert len(set(skus)) == len(skus)
    scores = [i.score for i in reply.items]
    assert scores == sorted(scores, reverse=True)
    catalogue = load_world(next((artifacts / "world").iterdir())).catalogue
    assert [i.restaurant_id for i in reply.items] == catalogue.item_restaurant[skus].tolist()
    assert catalogue.item_available[skus].all()
    assert catalogue.restaurant_is_open[catalogue.item_restaurant[skus]].all()
    layers = {e.layer: e for e in reply.experiments}
    assert "retrieval" in layers  # the layer that covers all traffic
    assert layers["retrieval"].arm in {"k200", "k400"}
    cap = 3 if layers.get("arrange") and layers["arrange"].arm == "cap-3" else 2
    _, per_restaurant = np.unique([i.restaurant_id for i in reply.items], return_counts=True)
    assert per_restaurant.max() <= cap

    again = await stub.Recommend(_request(user_id=KNOWN_USER, num_results=30))
    assert [i.sku_id for i in again.items] == skus  # deterministic for the same inputs
    assert list(again.experiments) == list(reply.experiments)


async def test_location_radius_and_exclusions_are_honoured(
    stub: recommender_pb2_grpc.RecommenderAsyncStub, artifacts: Path
) -> None:
    world = load_world(next((artifacts / "world").iterdir()))
    c = world.catalogue
    lat, lon = world.meta.center_lat, world.meta.center_lon
    first = await stub.Recommend(
        _request(user_id=KNOWN_USER, location=recommender_pb2.Location(lat=lat, lon=lon))
    )
    assert len(first.items) == 20
    rest = c.item_restaurant[[i.sku_id for i in first.items]]
    distance = haversine_km(lat, lon, c.restaurant_lat[rest], c.restaurant_lon[rest])
    assert distance.max() <= 8.0 + 1e-6  # PipelineParams.radius_km default

    excluded = [i.sku_id for i in first.items[:5]]
    second = await stub.Recommend(
        _request(
            user_id=KNOWN_USER,
            location=recommender_pb2.Location(lat=lat, lon=lon),
            exclude_sku_ids=excluded,
        )
    )
    assert len(second.items) == 20
    assert not {i.sku_id for i in second.items} & set(excluded)


async def test_an_unknown_user_gets_popular_items_flagged_not_an_error(
    stub: recommender_pb2_grpc.RecommenderAsyncStub,
) -> None:
    reply = await stub.Recommend(
        _request(user_id="never-seen", location=recommender_pb2.Location(lat=52.52, lon=13.40))
    )
    assert len(reply.items) == 20
    assert reply.degraded
    assert "unknown user" in reply.degraded_reason


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"user_id": ""}, "user_id"),
        ({"user_id": "u" * 129}, "user_id"),
        ({"user_id": "u", "num_results": 201}, "num_results"),
        ({"user_id": "u", "num_results": -1}, "num_results"),
        ({"user_id": "u", "location": recommender_pb2.Location(lat=91, lon=0)}, "location.lat"),
        ({"user_id": "u", "location": recommender_pb2.Location(lat=0, lon=-181)}, "location.lon"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    stub: recommender_pb2_grpc.RecommenderAsyncStub, fields: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Recommend(_request(**fields))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (caught.value.details() or "")


async def _until(predicate: Callable[[], Awaitable[bool]]) -> None:
    """Poll until ``predicate`` holds; fails after 10 s (generous: propagation is ~poll time)."""
    async with asyncio.timeout(10):
        while not await predicate():  # noqa: ASYNC110 - polls the server, no event to await
            await asyncio.sleep(0.05)


async def test_switched_off_items_disappear_live(
    stub: recommender_pb2_grpc.RecommenderAsyncStub, artifacts: Path
) -> None:
    before = await stub.Recommend(_request(user_id=KNOWN_USER, num_results=10))
    off = [before.items[0].sku_id, before.items[1].sku_id]
    store = open_store("", artifacts)
    doc = store.read("availability")
    assert doc is not None
    store.write(
        "availability",
        {"skus_off": off, "restaurants_off": [before.items[2].restaurant_id]},
        expected_version=doc.version,
        author="test",
    )
    store.close()

    async def gone() -> bool:
        reply = await stub.Recommend(_request(user_id=KNOWN_USER, num_results=10))
        return not {i.sku_id for i in reply.items} & set(off) and before.items[
            2
        ].restaurant_id not in {i.restaurant_id for i in reply.items}

    await _until(gone)
    after = await stub.Recommend(_request(user_id=KNOWN_USER, num_results=10))
    assert len(after.items) == 10


async def test_an_invalid_control_document_is_rejected_and_the_last_good_one_serves(
    stub: recommender_pb2_grpc.RecommenderAsyncStub, server: RunningServer, artifacts: Path
) -> None:
    store = open_store("", artifacts)
    doc = store.read("routing")
    assert doc is not None
    bad = {"index": doc.body["index"], "models": {"ranker": {"production": "no-such-version"}}}
    store.write("routing", bad, expected_version=doc.version, author="test")
    store.close()

    async def rejected() -> bool:
        text = await asyncio.to_thread(fetch_metrics, server.metrics_port)
        return 'recsys_control_rejected_documents_total{document="routing"} 1.0' in text

    await _until(rejected)
    reply = await stub.Recommend(_request(user_id=KNOWN_USER))
    assert reply.model_version == doc.body["models"]["ranker"]["production"]
    assert len(reply.items) == 20


async def test_exposure_log_records_what_each_customer_saw(
    server: RunningServer, stub: recommender_pb2_grpc.RecommenderAsyncStub, artifacts: Path
) -> None:
    reply = await stub.Recommend(_request(user_id=KNOWN_USER, request_id="seen-1"))
    await server.stop()
    lines = [record for _, _, record in iter_exposure_lines(default_exposure_dir(artifacts))]
    record = next(r for r in lines if r["request_id"] == "seen-1")
    assert record["sku_ids"] == [i.sku_id for i in reply.items]
    assert record["model_version"] == reply.model_version
    assert {e["layer"] for e in record["exposures"]} == {e.layer for e in reply.experiments}


async def test_a_cache_hit_answers_as_the_computed_answer_with_its_own_record_and_metrics(
    server: RunningServer, stub: recommender_pb2_grpc.RecommenderAsyncStub, artifacts: Path
) -> None:
    """The hit path answers with the computed answer's bytes and its own request id: the
    response is what the first (uncached) call got, field for field and byte for byte; its
    exposure record is written with its own request; every metric counts it."""
    sample = server.metrics.registry.get_sample_value
    users = load_world(next((artifacts / "world").iterdir())).users
    where = recommender_pb2.Location(lat=float(users.home_lat[1]), lon=float(users.home_lon[1]))
    located = {"user_id": KNOWN_USER, "location": where}
    first = await stub.Recommend(_request(**located, request_id="first-1"))
    hits_before = sample("recsys_result_cache_lookups_total", {"result": "hit"}) or 0.0
    again = await stub.Recommend(_request(**located, request_id="again-22"))
    assert sample("recsys_result_cache_lookups_total", {"result": "hit"}) == hits_before + 1
    expected = recommender_pb2.RecommendResponse()
    expected.CopyFrom(first)
    expected.request_id = "again-22"
    assert again == expected
    assert again.SerializeToString() == expected.SerializeToString()
    layer = first.experiments[0]
    exposures = {"layer": layer.layer, "experiment": layer.experiment, "arm": layer.arm}
    assert sample("recsys_experiment_exposures_total", exposures) is not None
    assert sample("recsys_requests_total", {"code": "OK"}) is not None
    await server.stop()
    lines = [record for _, _, record in iter_exposure_lines(default_exposure_dir(artifacts))]
    by_id = {r["request_id"]: r for r in lines}
    assert by_id["again-22"]["sku_ids"] == [i.sku_id for i in again.items]
    assert by_id["again-22"]["snapshot_id"] == again.snapshot_id
    assert by_id["again-22"]["location"] == [where.lat, where.lon]
    assert (by_id["first-1"]["cached"], by_id["again-22"]["cached"]) == (False, True)
    assert by_id["again-22"]["answer_of"]["request_id"] == "first-1"
    same = {"request_id", "ts", "cached"}
    assert {k: v for k, v in by_id["again-22"].items() if k not in same} == {
        k: v for k, v in by_id["first-1"].items() if k not in same
    }
