"""User vectors from the memory-mapped tables or a real Redis, with the fallback when Redis is
slow, down or lacks a user; the retriever serves the store's vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis

from recsys.ranking.feature_store import (
    MmapUserStore,
    RedisUserStore,
    open_user_store,
    publish_user_vectors,
    user_key,
)
from recsys.retrieval.availability import Availability
from recsys.retrieval.index import ItemIndex
from recsys.retrieval.retriever import RetrievalQuery, Retriever
from recsys.types import Float32Array
from tests.control.redis_helpers import free_port, redis_prefix, redis_url
from tests.retrieval.test_retriever import World, flat_index, world

__all__ = ["flat_index", "redis_prefix", "redis_url", "world"]

VERSION = "f1"


@pytest.fixture
def vectors() -> Float32Array:
    return np.random.default_rng(3).normal(size=(40, 8)).astype(np.float32)


@pytest.fixture
def user_ids() -> np.ndarray:
    return np.array([f"user-{i:03d}" for i in range(40)])


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_mmap_store_reads_rows_from_a_memory_mapped_table(
    tmp_path: Path, vectors: Float32Array
) -> None:
    np.save(tmp_path / "user_vectors.npy", vectors)
    mapped = np.load(tmp_path / "user_vectors.npy", mmap_mode="r")
    read = MmapUserStore(mapped).read(np.array([5, 0, 5]))
    np.testing.assert_array_equal(read.vectors, vectors[[5, 0, 5]])
    assert not read.degraded
    assert open_user_store(
        "", prefix="x", features_version=VERSION, user_ids=np.array([]), user_vectors=mapped
    ).read(np.array([1])).vectors.tolist() == [vectors[1].tolist()]


def test_redis_store_reads_a_batch_in_one_round_trip(
    redis_url: str, redis_prefix: str, vectors: Float32Array, user_ids: np.ndarray
) -> None:
    client = redis.Redis.from_url(redis_url)
    online = -vectors  # differs from the local copy, so the test sees where rows came from
    assert publish_user_vectors(client, redis_prefix, VERSION, user_ids, online) == 40
    store = open_user_store(
        redis_url,
        prefix=redis_prefix,
        features_version=VERSION,
        user_ids=user_ids,
        user_vectors=vectors,
        timeout_seconds=1.0,
    )
    try:
        read = store.read(np.array([3, 39, 0]))
        np.testing.assert_array_equal(read.vectors, online[[3, 39, 0]])
        assert not read.degraded
        assert store.read(np.array([], dtype=np.int64)).vectors.shape == (0, 8)
    finally:
        store.close()
        client.close()


def test_a_missing_or_malformed_user_falls_back_to_the_local_copy(
    redis_url: str, redis_prefix: str, vectors: Float32Array, user_ids: np.ndarray
) -> None:
    client = redis.Redis.from_url(redis_url)
    publish_user_vectors(client, redis_prefix, VERSION, user_ids, -vectors)
    client.delete(user_key(redis_prefix, VERSION, "user-007"))
    client.set(user_key(redis_prefix, VERSION, "user-008"), b"short")
    store = RedisUserStore(client, redis_prefix, VERSION, user_ids, vectors)
    read = store.read(np.array([6, 7, 8]))
    np.testing.assert_array_equal(read.vectors, np.stack([-vectors[6], vectors[7], vectors[8]]))
    assert read.degraded
    assert store.misses == 2
    store.close()


def test_redis_down_serves_the_local_copy_and_stops_asking_for_a_while(
    vectors: Float32Array, user_ids: np.ndarray
) -> None:
    clock = Clock()
    client = redis.Redis(
        host="127.0.0.1", port=free_port(), socket_timeout=0.2, socket_connect_timeout=0.2
    )
    store = RedisUserStore(
        client, "none:", VERSION, user_ids, vectors, retry_seconds=5.0, clock=clock
    )
    for _ in range(3):
        read = store.read(np.array([1, 2]))
        np.testing.assert_array_equal(read.vectors, vectors[[1, 2]])
        assert read.degraded
    assert store.failures == 1  # the next two reads did not try Redis
    clock.now += 6.0
    store.read(np.array([1]))
    assert store.failures == 2  # tried again after retry_seconds
    store.close()


def test_open_user_store_rejects_an_unknown_url(vectors: Float32Array) -> None:
    with pytest.raises(ValueError, match="http://x"):
        open_user_store(
            "http://x", prefix="", features_version="", user_ids=np.array([]), user_vectors=vectors
        )


def test_the_retriever_searches_with_the_vectors_the_store_served(
    world: World, flat_index: ItemIndex, redis_url: str, redis_prefix: str
) -> None:
    ids = np.array([f"u{i}" for i in range(world.users.shape[0])])
    online = np.ascontiguousarray(world.users[::-1])  # user i online = user n-1-i locally
    client = redis.Redis.from_url(redis_url)
    publish_user_vectors(client, redis_prefix, VERSION, ids, online)
    store = RedisUserStore(client, redis_prefix, VERSION, ids, world.users)
    availability = Availability.from_document(world.catalogue)
    retriever = Retriever(flat_index, world.users, world.catalogue, world.popularity, availability)
    n = world.users.shape[0]
    served = store.read(np.array([3]))
    assert not served.degraded
    got = retriever.retrieve_batch([RetrievalQuery(3, None, 20, 0, 8.0)], served.vectors)[0]
    want = retriever.retrieve_batch([RetrievalQuery(n - 1 - 3, None, 20, 0, 8.0)])[0]
    np.testing.assert_array_equal(got.sku_ids, want.sku_ids)
    client.delete(user_key(redis_prefix, VERSION, "u3"))
    fallback = store.read(np.array([3]))
    assert fallback.degraded
    local = retriever.retrieve_batch([RetrievalQuery(3, None, 20, 0, 8.0)], fallback.vectors)[0]
    same = retriever.retrieve_batch([RetrievalQuery(3, None, 20, 0, 8.0)])[0]
    np.testing.assert_array_equal(local.sku_ids, same.sku_ids)
    store.close()
