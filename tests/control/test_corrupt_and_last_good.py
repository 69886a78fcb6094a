"""Corrupt documents (rejected, counted, logged, replaceable), full bodies in history, and the
server's last good copies (kept at 0600, used at start when the store cannot serve)."""

from __future__ import annotations

import asyncio
import logging
import stat
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
import redis

from recsys.cli.main import main
from recsys.control.file_store import FileStore
from recsys.control.last_good import LAST_GOOD_DIRECTORY, LastGood
from recsys.control.redis_store import RedisStore
from recsys.control.store import (
    DOCUMENTS,
    EXPERIMENTS,
    ROUTING,
    CorruptDocument,
    DocumentStore,
    StoreUnavailable,
    VersionConflict,
)
from recsys.control.watch import watch
from recsys.serving.metrics import ServingMetrics
from recsys.serving.pipeline import open_pipeline
from recsys.serving.rest import HEALTH_PATH
from recsys.serving.server import RunningServer
from recsys.settings import ServeSettings
from tests.control.redis_helpers import ThrowawayRedis, free_port

REJECTED = "recsys_control_rejected_documents_total"
FROM_COPY = "recsys_control_from_last_good"
BROKEN = b'{"name": "experiments", "version": '


def corrupt(store: DocumentStore, name: str, text: bytes = BROKEN) -> int:
    version = store.read_version(name) + 1
    if isinstance(store, RedisStore):
        client = redis.Redis.from_url(store.url)
        try:
            client.set(store.keys(name).document, text)
            client.set(store.keys(name).version, version)
        finally:
            client.close()
    else:
        assert isinstance(store, FileStore)
        (store.directory / f"{name}.json").write_bytes(text)
        (store.directory / f"{name}.version").write_text(str(version))
    return version


@pytest.fixture(params=["file", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> DocumentStore:
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        return RedisStore(url, prefix=request.getfixturevalue("redis_prefix"))
    return FileStore(tmp_path / "control")


def test_a_corrupt_document_names_its_version_and_a_write_with_it_replaces_it(
    store: DocumentStore,
) -> None:
    try:
        store.write(EXPERIMENTS, {"v": 1}, expected_version=0, author="a")
        version = corrupt(store, EXPERIMENTS)
        with pytest.raises(CorruptDocument, match=f"the stored version {version} is corrupt") as e:
            store.read(EXPERIMENTS)
        assert e.value.version == version
        assert store.read_version(EXPERIMENTS) == version
        assert store.read_raw(EXPERIMENTS) == (version, BROKEN)
        stale = f"expected version 1 but the store has {version} \\(a corrupt document\\)"
        with pytest.raises(VersionConflict, match=stale):
            store.write(EXPERIMENTS, {"v": 3}, expected_version=1, author="ops")
        written = store.write(EXPERIMENTS, {"v": 3}, expected_version=version, author="ops")
        assert written.version == version + 1
        again = store.read(EXPERIMENTS)
        assert again is not None
        assert again.body == {"v": 3}
    finally:
        store.close()


def test_history_keeps_the_full_body_of_each_version(store: DocumentStore) -> None:
    try:
        store.write(EXPERIMENTS, {"v": 1, "x": [1]}, expected_version=0, author="a")
        store.write(EXPERIMENTS, {"v": 2, "x": [1]}, expected_version=1, author="b")
        entries = store.history(EXPERIMENTS)
        assert [(h.version, h.body) for h in entries] == [
            (2, {"v": 2, "x": [1]}),
            (1, {"v": 1, "x": [1]}),
        ]
        assert entries[0].changes == ("~v: 1 -> 2",)
    finally:
        store.close()


async def test_the_watcher_reports_each_corrupt_version_once_and_stays_connected(
    store: DocumentStore, tmp_path: Path
) -> None:
    store.write(EXPERIMENTS, {"v": 1}, expected_version=0, author="a")
    url = store.url if isinstance(store, RedisStore) else ""
    prefix = store.prefix if isinstance(store, RedisStore) else "recsys:"
    rejected: list[CorruptDocument] = []
    watcher = watch(
        url,
        EXPERIMENTS,
        artifacts=tmp_path,
        prefix=prefix,
        poll_seconds=0.02,
        on_rejected=rejected.append,
    )
    try:
        first = await asyncio.wait_for(anext(watcher), 10)
        assert first.version == 1
        version = corrupt(store, EXPERIMENTS)
        following = asyncio.ensure_future(anext(watcher))  # the watcher runs while awaited
        deadline = time.monotonic() + 10
        while not rejected:
            assert time.monotonic() < deadline, "the corrupt version was not reported"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # many polls: still one report
        assert [r.version for r in rejected] == [version]
        assert watcher.rejected == 1
        assert watcher.connected
        assert watcher.outages == 0
        store.write(EXPERIMENTS, {"v": 3}, expected_version=version, author="ops")
        assert not following.done()
        fixed = await asyncio.wait_for(following, 10)
        assert (fixed.version, fixed.body) == (version + 1, {"v": 3})
    finally:
        await watcher.aclose()
        store.close()


def test_last_good_copies_are_private_files(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "control")
    document = store.write(EXPERIMENTS, {"v": 1}, expected_version=0, author="a")
    copies = LastGood(tmp_path / "last-good")
    copies.save(document)
    path = copies.path(EXPERIMENTS)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert copies.load(EXPERIMENTS) == document
    assert copies.load("routing") is None


# The server: rejected documents are counted and logged; the start falls back to last good.


def settings_for(artifacts: Path, tmp_path: Path, control: str = "") -> ServeSettings:
    return ServeSettings(
        artifacts=artifacts,
        control=control,
        exposure_dir=tmp_path / "exposures",
        control_poll_seconds=0.02,
    )


async def wait_for(predicate: object, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_a_served_corrupt_document_is_counted_and_logged_once(
    artifacts: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = ServingMetrics()
    pipeline = await open_pipeline(settings_for(artifacts, tmp_path), metrics)
    store = FileStore(artifacts / "control")
    try:
        before = pipeline.snapshot
        with caplog.at_level(logging.ERROR, logger="recsys.serving.control"):
            version = corrupt(store, EXPERIMENTS)

            def counted() -> bool:
                return metrics.registry.get_sample_value(REJECTED, {"document": EXPERIMENTS}) == 1

            await wait_for(counted)
            await asyncio.sleep(0.3)
        assert counted()
        lines = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(lines) == 1
        assert f"experiments version {version} rejected (corrupt)" in lines[0].getMessage()
        assert "\n" not in lines[0].getMessage()
        assert pipeline.snapshot is before  # the last good snapshot keeps serving
    finally:
        store.close()
        await pipeline.close()


async def test_a_server_keeps_last_good_copies_and_starts_from_them_without_the_store(
    artifacts: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(artifacts, tmp_path)
    first = await open_pipeline(settings, ServingMetrics())
    try:
        versions = {name: doc.version for name, doc in first.snapshot.documents.items()}
    finally:
        await first.close()
    directory = settings.exposure_path / LAST_GOOD_DIRECTORY
    for name in DOCUMENTS:
        path = directory / f"{name}.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, name

    unreachable = settings_for(artifacts, tmp_path, f"redis://127.0.0.1:{free_port()}/0")
    metrics = ServingMetrics()
    with caplog.at_level(logging.WARNING, logger="recsys.serving.control"):
        pipeline = await open_pipeline(unreachable, metrics)
    try:
        started = {name: doc.version for name, doc in pipeline.snapshot.documents.items()}
        assert started == versions
        for name in DOCUMENTS:  # flagged where dashboards and alerts see it
            assert metrics.registry.get_sample_value(FROM_COPY, {"document": name}) == 1
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("from the last good local copy" in w and "unreachable" in w for w in warnings)
        assert pipeline._follower is not None
        assert set(pipeline._follower.from_last_good) == set(DOCUMENTS)
    finally:
        await pipeline.close()


async def healthz(port: int | None) -> tuple[int, dict[str, object]]:
    """``GET /healthz`` on the server's HTTP port: the status code and the JSON body."""
    assert port is not None
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{HEALTH_PATH}") as reply,
    ):
        return reply.status, await reply.json()


async def test_health_names_the_documents_served_from_last_good_copies_until_the_store_has_them(
    artifacts: Path, tmp_path: Path, throwaway_redis: ThrowawayRedis
) -> None:
    first = await open_pipeline(settings_for(artifacts, tmp_path), ServingMetrics())
    await first.close()  # it kept the last good copies, all at the build's version 1
    copies = settings_for(artifacts, tmp_path).exposure_path / LAST_GOOD_DIRECTORY
    throwaway_redis.stop()  # the store is unreachable when the server starts
    settings = replace(
        settings_for(artifacts, tmp_path, throwaway_redis.url),
        port=0,
        metrics_port=0,
        http_port=0,
        drain_seconds=1,
    )
    running = await RunningServer.start(settings, open_pipeline)
    try:
        await running.wait_ready()
        assert await healthz(running.http_port) == (
            200,
            {"status": "SERVING", "control_from_last_good": sorted(DOCUMENTS)},
        )
        throwaway_redis.start()  # back, empty: ops reseeds it from the copies, same versions
        reseed = ["control", "reseed", "--from", str(copies), "--artifacts", str(artifacts)]
        assert main([*reseed, "--control", throwaway_redis.url]) == 0
        deadline = time.monotonic() + 60  # a bound for a slow machine, not a measurement
        while (await healthz(running.http_port))[1]["control_from_last_good"]:
            assert time.monotonic() < deadline, "the server never took the store's versions"
            await asyncio.sleep(0.05)
        for name in DOCUMENTS:
            assert running.metrics.registry.get_sample_value(FROM_COPY, {"document": name}) == 0
    finally:
        await running.stop()


async def test_without_last_good_copies_an_unreachable_store_still_fails_the_start(
    artifacts: Path, tmp_path: Path
) -> None:
    unreachable = settings_for(artifacts, tmp_path, f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(StoreUnavailable):
        await open_pipeline(unreachable, ServingMetrics())


async def test_a_corrupt_stored_document_at_start_is_replaced_by_its_last_good_copy(
    artifacts: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(artifacts, tmp_path)
    first = await open_pipeline(settings, ServingMetrics())
    good = first.snapshot.documents[EXPERIMENTS].version
    await first.close()
    store = FileStore(artifacts / "control")
    version = corrupt(store, EXPERIMENTS)
    store.close()
    metrics = ServingMetrics()
    with caplog.at_level(logging.WARNING, logger="recsys.serving.control"):
        pipeline = await open_pipeline(settings, metrics)
    try:
        assert pipeline.snapshot.documents[EXPERIMENTS].version == good
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(f"stored version {version} is corrupt" in w for w in warnings)
        assert metrics.registry.get_sample_value(FROM_COPY, {"document": EXPERIMENTS}) == 1
        assert metrics.registry.get_sample_value(FROM_COPY, {"document": ROUTING}) == 0
        # the follower sees the corrupt version too, and counts it
        await wait_for(
            lambda: metrics.registry.get_sample_value(REJECTED, {"document": EXPERIMENTS}) == 1
        )
    finally:
        await pipeline.close()


async def test_an_invalid_stored_document_at_start_is_replaced_by_its_last_good_copy(
    artifacts: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(artifacts, tmp_path)
    first = await open_pipeline(settings, ServingMetrics())
    good = first.snapshot.documents[EXPERIMENTS].version
    await first.close()
    store = FileStore(artifacts / "control")
    store.write(EXPERIMENTS, {"layers": "nonsense"}, expected_version=good, author="oops")
    store.close()
    with caplog.at_level(logging.WARNING, logger="recsys.serving.control"):
        pipeline = await open_pipeline(settings, ServingMetrics())
    try:
        assert pipeline.snapshot.documents[EXPERIMENTS].version == good
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(f"stored version {good + 1} is invalid" in w for w in warnings)
    finally:
        await pipeline.close()
