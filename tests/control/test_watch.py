"""Watching a document: pub/sub speed, the polling fallback, outages and reconnection."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import redis

from recsys.control.file_store import FileStore
from recsys.control.redis_store import RedisStore
from recsys.control.store import Document
from recsys.control.watch import DocumentWatcher, watch
from tests.control.redis_helpers import ThrowawayRedis, free_port, require_redis_server, running


async def next_document(watcher: DocumentWatcher, within: float = 10.0) -> Document:
    return await asyncio.wait_for(anext(watcher), within)


async def wait_until(predicate: object, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_file_watcher_yields_current_then_each_new_version(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "control")
    store.write("experiments", {"v": 1}, expected_version=0, author="a")
    watcher = watch("", "experiments", artifacts=tmp_path, poll_seconds=0.05)
    try:
        first = await next_document(watcher)
        assert (first.version, first.body) == (1, {"v": 1})
        await asyncio.to_thread(
            store.write, "experiments", {"v": 2}, expected_version=1, author="b"
        )
        second = await next_document(watcher)
        assert (second.version, second.body, second.author) == (2, {"v": 2}, "b")
        assert watcher.connected
        assert watcher.last_version == 2
    finally:
        await watcher.aclose()


async def test_file_watcher_skips_versions_it_already_has(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "control")
    store.write("experiments", {"v": 1}, expected_version=0, author="a")
    watcher = watch("", "experiments", artifacts=tmp_path, poll_seconds=0.05, after_version=1)
    try:
        store.write("experiments", {"v": 2}, expected_version=1, author="a")
        assert (await next_document(watcher)).version == 2
    finally:
        await watcher.aclose()


async def test_redis_notification_arrives_without_waiting_for_a_poll(
    redis_url: str, redis_prefix: str
) -> None:
    store = RedisStore(redis_url, prefix=redis_prefix)
    store.write("experiments", {"v": 1}, expected_version=0, author="a")
    # a poll interval far beyond the timeout: only the pub/sub notification can deliver v2 in time
    watcher = watch(redis_url, "experiments", prefix=redis_prefix, poll_seconds=60.0)
    try:
        assert (await next_document(watcher)).version == 1
        pending = asyncio.ensure_future(next_document(watcher, within=10.0))
        await asyncio.sleep(0.2)  # let the watcher block on the channel
        await asyncio.to_thread(
            store.write, "experiments", {"v": 2}, expected_version=1, author="b"
        )
        second = await pending
        assert (second.version, second.body) == (2, {"v": 2})
        assert watcher.connected
    finally:
        await watcher.aclose()
        store.close()


async def test_redis_polling_finds_a_version_whose_notification_was_lost(
    redis_url: str, redis_prefix: str
) -> None:
    store = RedisStore(redis_url, prefix=redis_prefix)
    keys = store.keys("experiments")
    watcher = watch(redis_url, "experiments", prefix=redis_prefix, poll_seconds=0.1)
    client = redis.Redis.from_url(redis_url)
    try:
        pending = asyncio.ensure_future(next_document(watcher))
        await asyncio.sleep(0.3)
        doc = Document("experiments", 1, {"silent": True}, "raw", time.time())
        client.set(keys.document, doc.to_json())  # written without a PUBLISH
        client.set(keys.version, 1)
        assert (await pending).body == {"silent": True}
    finally:
        client.close()
        await watcher.aclose()
        store.close()


async def test_a_reset_store_is_followed_back_to_its_lower_version(
    redis_url: str, redis_prefix: str
) -> None:
    store = RedisStore(redis_url, prefix=redis_prefix)
    for v in range(3):
        store.write("experiments", {"v": v + 1}, expected_version=v, author="a")
    watcher = watch(redis_url, "experiments", prefix=redis_prefix, poll_seconds=0.1)
    client = redis.Redis.from_url(redis_url)
    try:
        assert (await next_document(watcher)).version == 3
        keys = store.keys("experiments")
        client.delete(keys.document, keys.version, keys.history)  # Redis lost its data
        store.write("experiments", {"v": "reseeded"}, expected_version=0, author="seed")
        again = await next_document(watcher)
        assert (again.version, again.body) == (1, {"v": "reseeded"})
        assert "went back from version 3 to 1" in watcher.last_error
    finally:
        client.close()
        await watcher.aclose()
        store.close()


async def test_unreachable_redis_reports_disconnected_and_yields_nothing() -> None:
    health: list[bool] = []
    watcher = watch(
        f"redis://127.0.0.1:{free_port()}/0",
        "experiments",
        prefix="recsys-test-none:",
        poll_seconds=0.1,
        on_health=health.append,
        after_version=7,
        max_backoff_seconds=0.2,
    )
    pending = asyncio.ensure_future(anext(watcher))
    try:
        await wait_until(lambda: watcher.outages >= 1)
        assert not watcher.connected
        assert "Connection refused" in watcher.last_error or "connect" in watcher.last_error
        assert not pending.done()
        assert watcher.last_version == 7  # the caller keeps serving what it had
        assert health == [False]  # reported once, not on every retry
    finally:
        pending.cancel()
        await watcher.aclose()


async def test_watcher_survives_a_redis_restart(throwaway_redis: ThrowawayRedis) -> None:
    store = RedisStore(throwaway_redis.url, prefix="recsys-test:")
    store.write("experiments", {"v": 1}, expected_version=0, author="a")
    health: list[bool] = []
    watcher = watch(
        throwaway_redis.url,
        "experiments",
        prefix="recsys-test:",
        poll_seconds=0.2,
        on_health=health.append,
        max_backoff_seconds=0.3,
    )
    try:
        assert (await next_document(watcher)).version == 1
        assert watcher.connected
        assert health == [True]
        pending = asyncio.ensure_future(next_document(watcher, within=30.0))
        await asyncio.sleep(0.3)
        throwaway_redis.stop()
        await wait_until(lambda: not watcher.connected)
        assert health == [True, False]
        assert watcher.outages == 1
        assert not pending.done()
        throwaway_redis.start()  # same port; the append-only file kept version 1
        await asyncio.to_thread(
            store.write, "experiments", {"v": 2}, expected_version=1, author="b"
        )
        second = await pending
        assert (second.version, second.body) == (2, {"v": 2})
        await wait_until(lambda: watcher.connected)
        assert health == [True, False, True]
    finally:
        await watcher.aclose()
        store.close()


async def test_a_store_reset_and_written_up_to_the_watchers_version_is_followed(
    tmp_path: Path,
) -> None:
    """A Redis that lost its data, reseeded (version 1) and written again (version 2) before the
    watcher looked: the same version number, another document."""
    require_redis_server()
    with running(ThrowawayRedis(free_port(), tmp_path, persistence=False)) as server:
        store = RedisStore(server.url, prefix="recsys-test:")
        watcher = watch(server.url, "experiments", prefix="recsys-test:", poll_seconds=0.2)
        try:
            store.write("experiments", {"v": "old 1"}, expected_version=0, author="a")
            store.write("experiments", {"v": "old 2"}, expected_version=1, author="a")
            assert (await next_document(watcher)).body == {"v": "old 2"}
            # The watcher runs only while awaited: all of this happens while it is away.
            server.stop(graceful=True)
            server.start()
            store.write("experiments", {"v": "new 1"}, expected_version=0, author="reseed")
            store.write("experiments", {"v": "new 2"}, expected_version=1, author="ops")
            again = await next_document(watcher, within=60.0)
            assert (again.version, again.body) == (2, {"v": "new 2"})
            assert "version 2 was written again" in watcher.last_error
        finally:
            await watcher.aclose()
            store.close()


def test_document_json_round_trip() -> None:
    doc = Document("experiments", 3, {"a": [1, {"b": None}]}, "alice", 1.5)
    assert Document.from_json(doc.to_json(), "test") == doc
    assert json.loads(doc.to_json())["version"] == 3


async def test_aclose_during_a_pending_read_leaves_no_connection_open(
    throwaway_redis: ThrowawayRedis,
) -> None:
    """Closing the connections under a running read made redis-py reconnect and leak them."""
    store = RedisStore(throwaway_redis.url, prefix="recsys-test:")
    store.write("experiments", {"v": 1}, expected_version=0, author="a")
    store.close()
    watchers = [
        watch(throwaway_redis.url, "experiments", prefix="recsys-test:", poll_seconds=0.5)
        for _ in range(3)
    ]
    ended: list[int] = []

    async def follow(watcher: DocumentWatcher) -> None:
        async for document in watcher:
            ended.append(-document.version)
        ended.append(1)  # the iteration ended by itself

    tasks = [asyncio.create_task(follow(w)) for w in watchers]
    await wait_until(lambda: len(ended) == 3)  # each read version 1 and waits for a message
    await asyncio.sleep(0.1)
    for watcher in watchers:
        await watcher.aclose()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert sorted(ended) == [-1, -1, -1, 1, 1, 1]
    await asyncio.sleep(0.5)  # a reconnection would happen meanwhile
    client = redis.Redis.from_url(throwaway_redis.url)
    try:
        others = [c for c in client.client_list() if c.get("cmd") != "client|list"]
    finally:
        client.close()
    assert others == []
