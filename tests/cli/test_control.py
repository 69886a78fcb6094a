"""Repairing the control plane through the real CLI: corrupt documents, exported versions,
`recsys control show/restore/reseed`, on the file store and on a real Redis (own prefix)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from recsys.cli.main import main
from recsys.control.backends import open_store
from recsys.control.file_store import FileStore
from recsys.control.last_good import LAST_GOOD_DIRECTORY, LastGood
from recsys.control.redis_store import RedisStore
from recsys.control.store import AVAILABILITY, DOCUMENTS, EXPERIMENTS, ROUTING, DocumentStore
from recsys.experiments.config import default_config
from recsys.serving.metrics import ServingMetrics
from recsys.serving.pipeline import open_pipeline
from recsys.settings import ServeSettings
from recsys.types import Request
from tests.control.redis_helpers import ThrowawayRedis, free_port, require_redis_server, running


@pytest.fixture(params=["file", "redis"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> list[str]:
    flags = ["--artifacts", str(tmp_path)]
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        flags += ["--control", url, "--control-prefix", request.getfixturevalue("redis_prefix")]
    return flags


def open_target(target: list[str]) -> DocumentStore:
    flags = dict(zip(target[::2], target[1::2], strict=True))
    return open_store(
        flags.get("--control", ""),
        Path(flags["--artifacts"]),
        prefix=flags.get("--control-prefix", "recsys:"),
    )


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def doc_file(tmp_path: Path, doc: dict[str, Any], name: str = "doc.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def corrupt(store: DocumentStore, name: str) -> int:
    """Store unparseable JSON as the next version (as a botched hand edit would); its version."""
    version = store.read_version(name) + 1
    if isinstance(store, RedisStore):
        keys = store.keys(name)
        client = redis.Redis.from_url(store.url)
        try:
            client.set(keys.document, b'{"name": "experiments", "version": ')
            client.set(keys.version, version)
        finally:
            client.close()
    else:
        assert isinstance(store, FileStore)
        (store.directory / f"{name}.json").write_text('{"name": "experiments", "version": ')
        (store.directory / f"{name}.version").write_text(str(version))
    return version


def applied(capsys: pytest.CaptureFixture[str], tmp_path: Path, target: list[str]) -> None:
    path = doc_file(tmp_path, default_config())
    assert run(capsys, "experiments", "apply", path, *target)[0] == 0


def test_read_commands_say_the_stored_version_is_corrupt(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, target: list[str]
) -> None:
    applied(capsys, tmp_path, target)
    store = open_target(target)
    try:
        version = corrupt(store, EXPERIMENTS)
    finally:
        store.close()
    for command in (["list"], ["show"], ["export"], ["ramp", "restaurant-cap", "50"]):
        code, _, err = run(capsys, "experiments", *command, *target)
        assert code == 2, command
        assert f"the stored version {version} is corrupt" in err, command
        assert "--force-over-corrupt" in err
    code, out, _ = run(capsys, "control", "show", EXPERIMENTS, *target)
    assert code == 1
    assert f"experiments: version {version}" in out
    assert "parses: no" in out


def test_apply_replaces_a_corrupt_document_only_when_forced(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, target: list[str]
) -> None:
    applied(capsys, tmp_path, target)
    store = open_target(target)
    try:
        version = corrupt(store, EXPERIMENTS)
        path = doc_file(tmp_path, default_config(), "fixed.json")
        code, _, err = run(capsys, "experiments", "apply", path, *target)
        assert code == 2
        assert f"the stored version {version} is corrupt" in err
        code, out, err = run(capsys, "experiments", "apply", path, "--force-over-corrupt", *target)
        assert code == 0, err
        assert f"version {version} -> {version + 1} written" in out
        fixed = store.read(EXPERIMENTS)
        assert fixed is not None
        assert (fixed.version, fixed.body) == (version + 1, default_config())
    finally:
        store.close()
    assert run(capsys, "experiments", "list", *target)[0] == 0


def test_apply_of_an_export_refuses_when_the_store_moved_on(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, target: list[str]
) -> None:
    applied(capsys, tmp_path, target)
    exported = tmp_path / "exported.json"
    code, _, err = run(capsys, "experiments", "export", str(exported), *target)
    assert code == 0, err
    edited = json.loads(exported.read_text())
    assert edited["_version"] == 1
    edited["kill_switch"] = True
    exported.write_text(json.dumps(edited))
    # another op changes the document meanwhile
    assert run(capsys, "experiments", "ramp", "restaurant-cap", "50", *target)[0] == 0
    code, _, err = run(capsys, "experiments", "apply", str(exported), *target)
    assert code == 2
    assert "expected version 1 but the store has 2" in err
    assert "--force" in err
    store = open_target(target)
    try:
        current = store.read(EXPERIMENTS)
        assert current is not None
        assert current.version == 2
        assert current.body.get("kill_switch") is not True  # the ramp was not overwritten
        code, out, err = run(capsys, "experiments", "apply", str(exported), "--force", *target)
        assert code == 0, err
        forced = store.read(EXPERIMENTS)
        assert forced is not None
        assert forced.version == 3
        assert forced.body["kill_switch"] is True
        assert "_version" not in forced.body
    finally:
        store.close()
    # an export that is current applies with its version as the expected one
    code, out, _ = run(capsys, "experiments", "export", *target)
    again = json.loads(out)
    assert again["_version"] == 3
    again["kill_switch"] = False
    assert run(capsys, "experiments", "validate", doc_file(tmp_path, again, "v.json"))[0] == 0
    code, out, err = run(capsys, "experiments", "apply", doc_file(tmp_path, again), *target)
    assert code == 0, err
    assert "version 3 -> 4 written" in out


def test_show_prints_version_author_time_and_parses(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, target: list[str]
) -> None:
    code, out, _ = run(capsys, "control", "show", EXPERIMENTS, *target)
    assert code == 1
    assert "no document" in out
    path = doc_file(tmp_path, default_config())
    assert run(capsys, "experiments", "apply", path, "--author", "alice", *target)[0] == 0
    code, out, _ = run(capsys, "control", "show", EXPERIMENTS, *target)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "experiments: version 1"
    assert lines[1].startswith("  written by: alice at 20")
    assert lines[2] == "  parses: yes"


def test_restore_writes_an_earlier_version_back_with_the_expected_version(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, target: list[str]
) -> None:
    store = open_target(target)
    try:
        store.write(AVAILABILITY, {"skus_off": [1]}, expected_version=0, author="a")
        store.write(AVAILABILITY, {"skus_off": [1, 2]}, expected_version=1, author="b")
        version = corrupt(store, AVAILABILITY)
        code, out, err = run(capsys, "control", "restore", AVAILABILITY, "1", *target)
        assert code == 0, err
        assert f"restored over version {version} (corrupt) as version {version + 1}" in out
        restored = store.read(AVAILABILITY)
        assert restored is not None
        assert (restored.version, restored.body) == (version + 1, {"skus_off": [1]})
        assert store.history(AVAILABILITY, limit=1)[0].body == {"skus_off": [1]}
        code, _, err = run(capsys, "control", "restore", AVAILABILITY, "99", *target)
        assert code == 2
        assert "version 99 is not in the history" in err
    finally:
        store.close()


def test_reseed_from_last_good_copies_restores_a_store_that_lost_its_data(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    target = ["--artifacts", str(tmp_path), "--control", redis_url, "--control-prefix"]
    target.append(redis_prefix)
    store = open_target(target)
    copies = LastGood(tmp_path / "exposures" / "control-last-good")
    try:
        for name in DOCUMENTS:
            copies.save(store.write(name, {"doc": name}, expected_version=0, author="ops"))
        store.write(AVAILABILITY, {"doc": "v2"}, expected_version=1, author="ops")
        # Redis restarted without persistence: every key is gone
        client = redis.Redis.from_url(redis_url)
        try:
            client.delete(*client.scan_iter(match=f"{redis_prefix}*"))
        finally:
            client.close()
        assert all(store.read(name) is None for name in DOCUMENTS)
        code, out, err = run(capsys, "control", "reseed", "--from", str(copies.directory), *target)
        assert code == 0, err
        assert "reseeded 3 document(s)" in out
        for name in DOCUMENTS:
            back = store.read(name)
            assert back is not None
            assert back.body == {"doc": name}
        # again: nothing is missing, nothing is overwritten
        store.write(AVAILABILITY, {"doc": "newer"}, expected_version=1, author="ops")
        code, out, _ = run(capsys, "control", "reseed", "--from", str(copies.directory), *target)
        assert "reseeded 0 document(s)" in out
        kept = store.read(AVAILABILITY)
        assert kept is not None
        assert kept.body == {"doc": "newer"}
    finally:
        store.close()


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60  # a bound for a slow machine, not a measurement
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_a_redis_restarted_without_persistence_is_recovered_by_one_reseed(
    capsys: pytest.CaptureFixture[str], artifacts: Path, tmp_path: Path
) -> None:
    require_redis_server()
    (tmp_path / "redis").mkdir()
    control = ThrowawayRedis(free_port(), tmp_path / "redis", persistence=False)
    ops = ["--artifacts", str(artifacts), "--control", control.url]
    with running(control):
        # Published as the fleet publishes them, then changed once while a server follows.
        assert run(capsys, "control", "reseed", "--from", str(artifacts / "control"), *ops)[0] == 0
        code, out, _ = run(capsys, "models", "train", *ops, "--seed", "6", "--no-compile")
        assert code == 0
        second = out.strip().splitlines()[-1]
        settings = ServeSettings(
            artifacts=artifacts,
            control=control.url,
            exposure_dir=tmp_path / "exposures",
            control_poll_seconds=0.1,
        )
        pipeline = await open_pipeline(settings, ServingMetrics())
        try:
            copies = LastGood(settings.exposure_path / LAST_GOOD_DIRECTORY)
            assert (
                run(capsys, "models", "canary", *ops, "ranker", second, "--percent", "10")[0] == 0
            )

            def routing_copy_version() -> int | None:
                copy = copies.load(ROUTING)
                return copy.version if copy else None

            await wait_until(lambda: routing_copy_version() == 2, "no last good copy of v2")
            kept = {name: copies.load(name) for name in DOCUMENTS}

            control.stop(graceful=True)  # SIGTERM: nothing is saved
            control.start()  # same port, empty
            code, out, _ = run(capsys, "control", "show", ROUTING, *ops)
            assert (code, out.strip()) == (1, f"routing: no document in {control.url}")
            code, _, err = run(capsys, "models", "promote", *ops, "ranker", second)
            assert code == 2
            assert "has no routing document" in err
            assert "recsys control reseed --from DIR" in err
            served = await pipeline.recommend(Request("r-1", "user-0000001", num_results=5))
            assert served.items  # the server keeps serving its snapshot meanwhile

            code, out, err = run(capsys, "control", "reseed", "--from", str(copies.directory), *ops)
            assert code == 0, err
            assert "reseeded 3 document(s)" in out
            store = open_store(control.url, artifacts)
            try:
                for name, copy in kept.items():
                    back = store.read(name)
                    assert back is not None
                    assert copy is not None
                    assert back.body == copy.body
                    assert back.version == 1  # versions start again; servers follow the reset
                    assert f"{name}: copy v{copy.version} " in out
            finally:
                store.close()
            code, out, err = run(capsys, "models", "promote", *ops, "ranker", second)
            assert code == 0, err
            assert out.startswith("routing version 2:")

            def production() -> object:
                return pipeline.snapshot.documents[ROUTING].body["models"]["ranker"]["production"]

            await wait_until(lambda: production() == second, "the server did not follow")
        finally:
            await pipeline.close()


def test_reseed_from_a_file_store(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    files = FileStore(tmp_path / "control")
    files.write(EXPERIMENTS, default_config(), expected_version=0, author="build")
    target = ["--artifacts", str(tmp_path), "--control", redis_url, "--control-prefix"]
    target.append(redis_prefix)
    code, out, err = run(capsys, "control", "reseed", "--from", str(files.directory), *target)
    assert code == 0, err
    assert "routing: no copy" in out
    store = open_target(target)
    try:
        back = store.read(EXPERIMENTS)
        assert back is not None
        assert back.body == default_config()
    finally:
        store.close()
