"""Serving follows the store: valid versions swap in, an invalid one never reaches serving."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from experiments.assignment import Assigner, RequestAttributes, compile_config
from experiments.config import ConfigError, default_config
from experiments.live import EXPERIMENTS_DOCUMENT, LiveAssigner
from recsys.control.store import Document, DocumentStore, open_store
from recsys.control.watch import watch


async def eventually(condition: Callable[[], bool], within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@pytest.fixture(params=["file", "redis"])
def store_url(request: pytest.FixtureRequest) -> tuple[str, str]:
    if request.param == "file":
        return "", "recsys:"
    return request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")


async def test_follow_applies_valid_versions_and_rejects_invalid_ones(
    store_url: tuple[str, str], tmp_path: Path
) -> None:
    url, prefix = store_url
    store: DocumentStore = open_store(url, tmp_path, prefix=prefix)
    rejected: list[tuple[int, str]] = []
    applied: list[str] = []
    live = LiveAssigner(
        compile_config(default_config(), version="0"),
        on_applied=lambda a: applied.append(a.version),
        on_rejected=lambda d, e: rejected.append((d.version, str(e))),
    )
    watcher = watch(url, EXPERIMENTS_DOCUMENT, artifacts=tmp_path, prefix=prefix, poll_seconds=0.05)
    task = asyncio.create_task(live.follow(watcher))
    try:
        doc = default_config()
        store.write(EXPERIMENTS_DOCUMENT, doc, expected_version=0, author="a")
        await eventually(lambda: live.current.version == "1")
        doc["kill_switch"] = True
        store.write(EXPERIMENTS_DOCUMENT, doc, expected_version=1, author="a")
        await eventually(lambda: live.current.version == "2")
        assert live.current.assign("u1", RequestAttributes()).exposures == ()

        bad = default_config()
        bad["layers"][0]["experiments"][0]["arms"][0]["weight"] = -1
        store.write(EXPERIMENTS_DOCUMENT, bad, expected_version=2, author="mallory")
        await eventually(lambda: live.rejected == 1)
        assert live.current.version == "2"  # the last good snapshot keeps serving
        assert rejected[0][0] == 3
        assert "arms[0].weight: expected > 0" in rejected[0][1]

        store.write(EXPERIMENTS_DOCUMENT, default_config(), expected_version=3, author="a")
        await eventually(lambda: live.current.version == "4")
        assert applied == ["1", "2", "4"]
        assert live.current.assign("u1", RequestAttributes()).exposures != ()
    finally:
        task.cancel()
        await watcher.aclose()
        store.close()


def test_apply_keeps_the_old_snapshot_on_error() -> None:
    first = compile_config(default_config(), version="1")
    live = LiveAssigner(first)
    assert not live.apply(Document("experiments", 2, {"schema": 1}, "a", 0.0))
    assert live.current is first
    assert live.rejected == 1
    assert live.apply(Document("experiments", 3, default_config(), "a", 0.0))
    assert isinstance(live.current, Assigner)
    assert live.current.version == "3"


def test_compile_rejects_unknown_model_versions() -> None:
    doc = default_config()
    doc["layers"][0]["launch_defaults"] = {"model_version": "v9"}
    live = LiveAssigner(compile_config(default_config()), known_model_versions={"v1"})
    with pytest.raises(ConfigError, match="unknown model version 'v9'"):
        live.compile(Document("experiments", 2, doc, "a", 0.0))
