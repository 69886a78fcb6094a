"""Repairing the control plane through the real CLI: corrupt documents, exported versions,
`recsys control show/restore/reseed`, on the file store and on a real Redis (own prefix)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis

from recsys.cli.main import main
from recsys.control.backends import open_store
from recsys.control.file_store import FileStore
from recsys.control.last_good import LastGood
from recsys.control.redis_store import RedisStore
from recsys.control.store import AVAILABILITY, DOCUMENTS, EXPERIMENTS, DocumentStore
from recsys.experiments.config import default_config


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
