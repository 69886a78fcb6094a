"""Real servers following one Redis: each new experiments version reaches every server, an
invalid one reaches none, and a Redis outage leaves the last good config serving."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest

from recsys.control.redis_store import RedisStore
from recsys.control.store import EXPERIMENTS
from recsys.experiments import changes
from recsys.experiments.config import parse_config
from recsys.serving.pipeline import open_pipeline
from recsys.serving.server import RunningServer
from recsys.settings import ServeSettings
from recsys.v1 import recommender_pb2, recommender_pb2_grpc
from tests.control.redis_helpers import ThrowawayRedis, redis_prefix, redis_url, throwaway_redis
from tests.serving.metrics_page import fetch_metrics

__all__ = ["redis_prefix", "redis_url", "throwaway_redis"]

KNOWN_USER = "user-0000001"


async def start_server(stack: AsyncExitStack, artifacts: Path, control: str, prefix: str) -> Any:
    settings = ServeSettings(
        artifacts=artifacts,
        port=0,
        metrics_port=0,
        control=control,
        control_prefix=prefix,
        control_poll_seconds=0.2,
        drain_seconds=1,
    )
    running = await RunningServer.start(settings, open_pipeline)
    stack.push_async_callback(running.stop)
    await running.wait_ready()
    channel = await stack.enter_async_context(
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    )
    return running, recommender_pb2_grpc.RecommenderStub(channel)


async def config_version(stub: Any) -> str:
    reply = await stub.Recommend(
        recommender_pb2.RecommendRequest(user_id=KNOWN_USER, num_results=5), timeout=10
    )
    assert reply.items  # a served feed, whatever the arms' parameters
    return str(reply.config_version)


def scrape(metrics_port: int, sample: str) -> float | None:
    """The value of ``sample`` (name with labels, as exposed) on a server's /metrics page."""
    for line in fetch_metrics(metrics_port).splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 30.0) -> None:
    """Until the coroutine ``check()`` returns true (no timing assertion: a generous bound)."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def write_ramp(store: RedisStore, percent: int, base: dict[str, Any] | None = None) -> int:
    """What `recsys experiments ramp restaurant-cap PERCENT` writes (over ``base`` if given, else
    over the stored document); returns the new version."""
    current = store.read(EXPERIMENTS)
    assert current is not None
    start = current.body if base is None else base
    prepared = changes.prepare_write(current.body, changes.ramp(start, "restaurant-cap", percent))
    parse_config(prepared.doc)
    return store.write(
        EXPERIMENTS, prepared.doc, expected_version=current.version, author="test"
    ).version


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as s:
        yield s


async def test_every_server_applies_each_valid_version_and_no_server_an_invalid_one(
    artifacts: Path, redis_url: str, redis_prefix: str, stack: AsyncExitStack
) -> None:
    servers = [await start_server(stack, artifacts, redis_url, redis_prefix) for _ in range(2)]
    store = RedisStore(redis_url, prefix=redis_prefix)
    stack.callback(store.close)
    # the first server seeded Redis from the artifact root; the second found it there
    seeded = store.read(EXPERIMENTS)
    assert seeded is not None
    assert seeded.version == 1
    assert seeded.author.startswith("seed:")
    for _, stub in servers:
        assert await config_version(stub) == "1"

    version = await asyncio.to_thread(write_ramp, store, 50)
    for _, stub in servers:
        await eventually(partial(_serves, stub, str(version)))

    # A document that skips the ops write path (the store checks only that it is JSON): an arm
    # parameter the pipeline does not know. Every server rejects it and keeps version 2.
    bad = store.read(EXPERIMENTS)
    assert bad is not None
    good = copy.deepcopy(bad.body)
    body = bad.body
    body["layers"][1]["experiments"][0]["arms"][0]["params"] = {"retrieval_depth": 5}
    store.write(EXPERIMENTS, body, expected_version=bad.version, author="test")
    rejected = 'recsys_control_rejected_documents_total{document="experiments"}'
    for running, _ in servers:
        await eventually(partial(_metric_is, running.metrics_port, rejected, 1.0))
    for _, stub in servers:
        assert await config_version(stub) == str(version)  # the last good version

    fixed = await asyncio.to_thread(write_ramp, store, 40, good)  # the next valid version
    assert fixed == version + 2
    for _, stub in servers:
        await eventually(partial(_serves, stub, str(fixed)))


async def test_a_redis_outage_keeps_the_last_good_config_serving_and_reconnects(
    artifacts: Path, throwaway_redis: ThrowawayRedis, stack: AsyncExitStack
) -> None:
    prefix = "recsys-test:"
    running, stub = await start_server(stack, artifacts, throwaway_redis.url, prefix)
    connected = 'recsys_control_plane_connected{document="experiments"}'
    assert await config_version(stub) == "1"
    await eventually(partial(_metric_is, running.metrics_port, connected, 1.0))

    throwaway_redis.stop()
    await eventually(partial(_metric_is, running.metrics_port, connected, 0.0))
    for _ in range(3):  # Redis is away: the server answers with what it has
        assert await config_version(stub) == "1"

    throwaway_redis.start()  # same port; the append-only file kept the documents
    store = RedisStore(throwaway_redis.url, prefix=prefix)
    stack.callback(store.close)
    version = await asyncio.to_thread(write_ramp, store, 50)
    await eventually(partial(_serves, stub, str(version)))
    await eventually(partial(_metric_is, running.metrics_port, connected, 1.0))


async def _serves(stub: Any, version: str) -> bool:
    return await config_version(stub) == version


async def _metric_is(metrics_port: int, sample: str, value: float) -> bool:
    return await asyncio.to_thread(scrape, metrics_port, sample) == value


async def test_arm_parameters_drive_the_pipeline_and_a_forced_arm_says_so(
    artifacts: Path, redis_url: str, redis_prefix: str, stack: AsyncExitStack
) -> None:
    _, stub = await start_server(stack, artifacts, redis_url, redis_prefix)
    store = RedisStore(redis_url, prefix=redis_prefix)
    stack.callback(store.close)
    request = recommender_pb2.RecommendRequest(user_id=KNOWN_USER, num_results=30)
    before = await stub.Recommend(request, timeout=10)
    assert len(before.items) == 30  # retrieval depth 200 or 400 by default

    current = store.read(EXPERIMENTS)
    assert current is not None
    doc = copy.deepcopy(current.body)
    retrieval = doc["layers"][0]["experiments"][0]
    retrieval["arms"] = [{"name": "k10", "weight": 1, "params": {"retrieval_k": 10}}]
    cap = doc["layers"][1]["experiments"][0]
    cap["buckets"] = [[0, 10_000]]
    cap["arms"] = [{"name": "cap-1", "weight": 1, "params": {"max_per_restaurant": 1}}]
    doc["holdout"]["buckets"] = []
    doc["test_users"] = {KNOWN_USER: {"retrieval-depth": "k10"}}
    prepared = changes.prepare_write(current.body, doc)
    parse_config(prepared.doc)
    written = store.write(
        EXPERIMENTS, prepared.doc, expected_version=current.version, author="test"
    )
    await eventually(partial(_serves, stub, str(written.version)))

    for user_id, forced in ((KNOWN_USER, True), ("user-0000002", False)):
        reply = await stub.Recommend(
            recommender_pb2.RecommendRequest(user_id=user_id, num_results=30), timeout=10
        )
        assert 0 < len(reply.items) <= 10  # retrieval depth 10: at most 10 candidates
        restaurants = [i.restaurant_id for i in reply.items]
        assert len(set(restaurants)) == len(restaurants)  # at most 1 item per restaurant
        arms = {(e.experiment, e.arm, e.forced) for e in reply.experiments}
        assert ("retrieval-depth", "k10", forced) in arms
        assert ("restaurant-cap", "cap-1", False) in arms
