"""Serving user vectors from the online feature store (Redis), and serving on when it is down."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis

from recsys.artifacts import ArtifactRoot, read_manifest
from recsys.cli.main import main
from recsys.control.backends import open_store
from recsys.ranking.feature_store import publish_user_vectors
from recsys.ranking.features import load_feature_tables, user_feature_rows
from recsys.ranking.stages import STALE_USER_VECTOR
from recsys.serving.pipeline import open_pipeline
from recsys.serving.server import RunningServer
from recsys.settings import ServeSettings
from recsys.v1 import recommender_pb2, recommender_pb2_grpc
from recsys.world import CUISINES, load_world
from tests.control.redis_helpers import REDIS_URL, redis_answers

KNOWN_USER = "user-0000001"
NOTHING_LISTENS = "redis://127.0.0.1:1/0"


@pytest.fixture
def prefix() -> Iterator[str]:
    if not redis_answers(REDIS_URL):
        pytest.skip(f"no Redis answers at {REDIS_URL} (CI starts one; locally: redis-server)")
    name = f"recsys-test-{uuid.uuid4().hex}:"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{name}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


async def _recommend(settings: ServeSettings) -> recommender_pb2.RecommendResponse:
    running = await RunningServer.start(settings, open_pipeline)
    try:
        await running.wait_ready()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub: recommender_pb2_grpc.RecommenderAsyncStub = recommender_pb2_grpc.RecommenderStub(
                channel
            )
            return await stub.Recommend(recommender_pb2.RecommendRequest(user_id=KNOWN_USER))
    finally:
        await running.stop()


@pytest.fixture
def settings(artifacts: Path) -> ServeSettings:
    # A busy test machine can take longer than the served 5 ms to answer a local Redis: the
    # tests that expect the online rows give the store all the time it needs.
    return ServeSettings(
        artifacts=artifacts,
        port=0,
        metrics_port=0,
        drain_seconds=2,
        feature_store_timeout_ms=5_000,
    )


async def test_published_vectors_serve_the_same_feed_as_the_local_tables(
    settings: ServeSettings, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["features", "publish", "--artifacts", str(settings.artifacts),
         "--feature-store", REDIS_URL, "--control-prefix", prefix]
    )  # fmt: skip
    assert code == 0
    assert "published 1,500 user feature rows" in capsys.readouterr().out

    local = await _recommend(settings)
    online = await _recommend(
        ServeSettings(**{**settings.__dict__, "feature_store": REDIS_URL, "control_prefix": prefix})
    )
    assert not online.degraded, online.degraded_reason
    assert [i.sku_id for i in online.items] == [i.sku_id for i in local.items]


async def test_an_unreachable_feature_store_degrades_but_still_answers(
    settings: ServeSettings,
) -> None:
    reply = await _recommend(
        ServeSettings(**{**settings.__dict__, "feature_store": NOTHING_LISTENS})
    )
    assert len(reply.items) == 20
    assert reply.degraded
    assert STALE_USER_VECTOR in reply.degraded_reason


async def test_ranking_reads_the_per_user_features_the_store_serves(
    settings: ServeSettings, prefix: str
) -> None:
    """Rows whose vector part is the local one but whose ranking inputs differ: retrieval finds
    the same candidates, and the scores move, so ranking took its user inputs from the store."""
    root = ArtifactRoot(settings.artifacts)
    routing = open_store("", settings.artifacts).read("routing")
    assert routing is not None
    index = read_manifest(root.indexes / str(routing.body["index"]))
    features_version = str(index["features_version"])
    directory = root.features / features_version
    catalogue = load_world(root.world / str(read_manifest(directory)["world_version"])).catalogue
    tables = load_feature_tables(directory, catalogue)
    rows = user_feature_rows(tables, np.arange(tables.n_users))
    d, c = tables.dim, len(CUISINES)
    rows[:, d : d + c] = rows[:, d : d + c][:, ::-1]  # another cuisine taste
    rows[:, d + c] *= 3.0  # another price level
    client = redis.Redis.from_url(REDIS_URL)
    publish_user_vectors(client, prefix, features_version, tables.user_ids, rows)
    client.close()

    local = await _recommend(settings)
    online = await _recommend(
        ServeSettings(**{**settings.__dict__, "feature_store": REDIS_URL, "control_prefix": prefix})
    )
    assert not online.degraded, online.degraded_reason
    assert [i.score for i in online.items] != [i.score for i in local.items]
