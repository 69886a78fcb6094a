"""Redis backend specifics: keys stay under the prefix, notifications, and an unreachable server."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from recsys.control.backends import open_store
from recsys.control.redis_store import RedisStore
from recsys.control.store import StoreUnavailable
from tests.control.redis_helpers import free_port


def test_every_key_is_under_the_prefix(redis_url: str, redis_prefix: str, tmp_path: Path) -> None:
    store = open_store(redis_url, tmp_path, prefix=redis_prefix)
    assert isinstance(store, RedisStore)
    client = redis.Redis.from_url(redis_url)
    try:
        before = set(client.scan_iter(match="*", count=1000))
        store.write("experiments", {"a": 1}, expected_version=0, author="a")
        store.write("experiments", {"a": 2}, expected_version=1, author="a")
        created = set(client.scan_iter(match="*", count=1000)) - before
        assert created, "the write created no keys"
        assert all(k.decode().startswith(redis_prefix) for k in created), created
        assert int(client.get(store.keys("experiments").version) or 0) == 2
    finally:
        client.close()
        store.close()


def test_a_write_publishes_its_version(redis_url: str, redis_prefix: str, tmp_path: Path) -> None:
    store = RedisStore(redis_url, prefix=redis_prefix)
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    try:
        pubsub.subscribe(store.keys("experiments").channel)
        store.write("experiments", {"a": 1}, expected_version=0, author="a")
        message = None
        for _ in range(50):
            message = pubsub.get_message(timeout=0.1)
            if message is not None:
                break
        assert message is not None
        assert message["data"] == b"1"
    finally:
        pubsub.close()
        client.close()
        store.close()


def test_prefixes_isolate_stores(redis_url: str, redis_prefix: str) -> None:
    a = RedisStore(redis_url, prefix=redis_prefix + "a:")
    b = RedisStore(redis_url, prefix=redis_prefix + "b:")
    try:
        a.write("experiments", {"who": "a"}, expected_version=0, author="a")
        assert b.read("experiments") is None
    finally:
        a.close()
        b.close()


def test_unreachable_redis_raises_a_clear_error() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", prefix="recsys-test-none:")
    try:
        with pytest.raises(StoreUnavailable, match="cannot reach Redis to read experiments"):
            store.read("experiments")
        with pytest.raises(StoreUnavailable, match="cannot reach Redis"):
            store.write("experiments", {}, expected_version=0, author="a")
    finally:
        store.close()
