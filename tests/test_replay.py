"""Replay over a real server's exposure log: a promotion, an experiment ramp and an availability
change happen between requests of the same user, and each request replays with its own
versions, exactly."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import grpc
import pytest

from recsys.artifacts import ArtifactRoot
from recsys.cli.main import main
from recsys.control.backends import open_store
from recsys.pipeline.archive import snapshot_directory
from recsys.ranking.registry import ModelRegistry
from recsys.replay import LoggedRequest, Replayer, ReplayError, find_record
from recsys.serving.pipeline import open_pipeline
from recsys.serving.server import RunningServer
from recsys.settings import ServeSettings
from recsys.types import Location
from recsys.v1 import recommender_pb2, recommender_pb2_grpc

USER = "user-0000007"
NAME = "ranker"


@pytest.fixture(scope="module")
def two_models(artifacts_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A private artifact root with a second ranker version registered (not yet routed)."""
    out = tmp_path_factory.mktemp("replay") / "artifacts"
    shutil.copytree(artifacts_dir, out, ignore=shutil.ignore_patterns("exposures"))
    store = open_store("", out)
    try:
        second = ModelRegistry(ArtifactRoot(out), store).train(NAME, seed=29)
    finally:
        store.close()
    return out, second


async def _recommend(
    stub: recommender_pb2_grpc.RecommenderAsyncStub, previous: str
) -> recommender_pb2.RecommendResponse:
    """A request of USER once the server serves a snapshot other than ``previous``."""
    for _ in range(600):
        reply: recommender_pb2.RecommendResponse = await stub.Recommend(
            recommender_pb2.RecommendRequest(
                user_id=USER, num_results=12, location=recommender_pb2.Location(lat=52.52, lon=13.4)
            )
        )
        if reply.snapshot_id != previous:
            return reply
        await asyncio.sleep(0.05)
    raise AssertionError(f"the server kept serving snapshot {previous}")


async def test_each_request_replays_exactly_with_the_versions_it_was_served_by(
    two_models: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    artifacts, second = two_models
    exposures = tmp_path / "exposures"
    settings = ServeSettings(
        artifacts=artifacts,
        port=0,
        metrics_port=0,
        control_poll_seconds=0.05,
        drain_seconds=2,
        exposure_dir=exposures,
        exposure_candidates_share=1.0,
    )
    store = open_store("", artifacts)
    registry = ModelRegistry(ArtifactRoot(artifacts), store)
    server = await RunningServer.start(settings, open_pipeline)
    replies = []
    try:
        await server.wait_ready()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = recommender_pb2_grpc.RecommenderStub(channel)
            replies.append(await _recommend(stub, ""))
            first = replies[0].model_version

            registry.promote(NAME, second)  # a promotion
            replies.append(await _recommend(stub, replies[-1].snapshot_id))

            experiments = store.read("experiments")
            assert experiments is not None
            body = json.loads(json.dumps(experiments.body))
            cap = body["layers"][1]["experiments"][0]
            assert cap["name"] == "restaurant-cap"
            cap["buckets"] = [[0, 10_000]]  # a ramp to every bucket of the layer
            store.write("experiments", body, expected_version=experiments.version, author="t")
            replies.append(await _recommend(stub, replies[-1].snapshot_id))

            served_first = replies[-1].items[0]
            availability = store.read("availability")
            assert availability is not None
            store.write(
                "availability",
                {"skus_off": [served_first.sku_id], "restaurants_off": []},
                expected_version=availability.version,
                author="t",
            )  # an availability change
            replies.append(await _recommend(stub, replies[-1].snapshot_id))
    finally:
        await server.stop()  # flushes the exposure log
        store.close()

    assert len({r.snapshot_id for r in replies}) == 4
    assert [r.model_version for r in replies] == [first, second, second, second]
    assert served_first.sku_id not in [i.sku_id for i in replies[-1].items]
    replayer = Replayer(artifacts, snapshot_directory(exposures))
    for reply in replies:
        logged = LoggedRequest.parse(find_record(exposures, reply.request_id))
        assert logged.snapshot_id == reply.snapshot_id
        replayed = replayer.replay(logged)
        assert replayed.exact, (reply.request_id, replayed)
        assert list(replayed.sku_ids) == [i.sku_id for i in reply.items]
        assert replayed.model_version == reply.model_version
        assert [e.arm for e in replayed.exposures] == [e.arm for e in reply.experiments]

    # The same through the commands a person types.
    where = ["--artifacts", str(artifacts), "--exposures", str(exposures)]
    rid = replies[2].request_id
    assert main(["exposures", "show", rid, *where]) == 0
    shown = capsys.readouterr().out
    assert f"snapshot {replies[2].snapshot_id}" in shown
    assert "arrange/restaurant-cap=" in shown
    assert main(["exposures", "user", USER, *where]) == 0
    listed = capsys.readouterr().out.splitlines()
    listed_ids = [line.split()[1] for line in listed]  # every call, the polls included
    assert [i for i in listed_ids if i in {r.request_id for r in replies}] == [
        r.request_id for r in replies
    ]
    assert main(["replay", rid, *where]) == 0
    assert "reproduced exactly: 12 of 12 items the same" in capsys.readouterr().out
    assert main(["replay", rid, "--explain", "--json", *where]) == 0
    explained = json.loads(capsys.readouterr().out)
    assert [item["sku_id"] for item in explained] == [i.sku_id for i in replies[2].items]
    for item, served in zip(explained, replies[2].items, strict=True):
        total = item["bias"] + sum(c["contribution"] for c in item["contributions"])
        assert total == pytest.approx(served.score, abs=1e-4)  # contributions add up
    assert main(["replay", "--sample", "4", "--against", first, "--json", *where]) == 0
    diff = json.loads(capsys.readouterr().out)["slices"]
    overall = diff["overall"]["all"]
    assert overall["requests"] == 4
    assert sum(d["requests"] for d in diff["district"].values()) == 4  # every request placed
    assert set(diff["surface"]) == {"home"}
    assert 0.0 <= overall["top_k_overlap"] <= 1.0
    assert main(["replay", "nope", *where]) == 2
    assert "no exposure record of request nope" in capsys.readouterr().err

    # A version retired since is named, not guessed around.
    shutil.rmtree(artifacts / "models" / NAME / second)
    late = LoggedRequest.parse(find_record(exposures, replies[1].request_id))
    with pytest.raises(ReplayError, match=f"retired from .*model ranker {second}"):
        Replayer(artifacts, snapshot_directory(exposures)).replay(late)


def test_an_unknown_request_id_names_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "exposures-1-1-0.jsonl").write_text('{"request_id": "other"}\n')
    with pytest.raises(ReplayError, match="no exposure record of request nope"):
        find_record(tmp_path, "nope")


def test_a_missing_snapshot_manifest_is_named(artifacts_dir: Path, tmp_path: Path) -> None:
    replayer = Replayer(artifacts_dir, tmp_path / "snapshots")
    with pytest.raises(ReplayError, match="0123456789abcdef"):
        replayer.snapshot("0123456789abcdef")


def test_a_record_without_the_replay_fields_is_refused_with_the_field_named() -> None:
    with pytest.raises(ReplayError, match="'location'"):
        LoggedRequest.parse({"request_id": "r1"})


async def test_a_cache_hit_replays_exactly_from_the_request_its_answer_was_computed_for(
    artifacts: Path, tmp_path: Path
) -> None:
    """A hit shares the answer computed for an earlier request in the same ~500 m cell: its
    record names that request and location, and the replay uses them (the hit's own location
    gives other distances, so other scores)."""
    exposures = tmp_path / "exposures"
    settings = ServeSettings(
        artifacts=artifacts,
        port=0,
        metrics_port=0,
        drain_seconds=2,
        exposure_dir=exposures,
        cache_entries=1000,
    )
    server = await RunningServer.start(settings, open_pipeline)
    replies = []
    try:
        await server.wait_ready()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = recommender_pb2_grpc.RecommenderStub(channel)
            for lat, lon in ((52.5201, 13.4001), (52.5239, 13.4039)):  # one cache cell
                replies.append(
                    await stub.Recommend(
                        recommender_pb2.RecommendRequest(
                            user_id=USER,
                            num_results=12,
                            location=recommender_pb2.Location(lat=lat, lon=lon),
                        )
                    )
                )
    finally:
        await server.stop()  # flushes the exposure log

    computed, hit = (LoggedRequest.parse(find_record(exposures, r.request_id)) for r in replies)
    assert (computed.record["cached"], hit.record["cached"]) == (False, True)
    assert hit.record["answer_of"] == {
        "request_id": replies[0].request_id,
        "location": [52.5201, 13.4001],
    }
    assert hit.request.location == Location(52.5201, 13.4001)  # the answer's, for replay
    assert hit.record["location"] == [52.5239, 13.4039]  # what the user sent, kept
    replayer = Replayer(artifacts, snapshot_directory(exposures))
    for reply, logged in zip(replies, (computed, hit), strict=True):
        replayed = replayer.replay(logged)
        assert replayed.exact, (reply.request_id, replayed)
        assert list(replayed.sku_ids) == [i.sku_id for i in reply.items]
