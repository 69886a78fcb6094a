"""File backend specifics: where it writes, and that a write is a whole-file rename."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from recsys.control.backends import open_store
from recsys.control.file_store import FileStore
from recsys.control.store import StoreError, VersionConflict


def test_default_location_is_the_artifact_roots_control_dir(tmp_path: Path) -> None:
    store = open_store("", tmp_path)
    store.write("experiments", {"a": 1}, expected_version=0, author="a")
    stored = json.loads((tmp_path / "control" / "experiments.json").read_text())
    assert stored["version"] == 1
    assert stored["body"] == {"a": 1}
    assert open_store("file:", tmp_path).read_version("experiments") == 1
    other = tmp_path / "elsewhere"
    assert isinstance(open_store(f"file:{other}", tmp_path), FileStore)


def test_no_temporary_files_are_left_behind(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    for v in range(5):
        store.write("experiments", {"v": v}, expected_version=v, author="a")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "experiments.history.jsonl",
        "experiments.json",
        "experiments.lock",
        "experiments.version",
    ]


def test_corrupt_document_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "experiments.json").write_text("{not json")
    with pytest.raises(StoreError, match="not a stored document"):
        FileStore(tmp_path).read("experiments")


def _increment(directory: str, count: int) -> None:
    store = FileStore(Path(directory))
    done = 0
    while done < count:
        current = store.read("experiments")
        assert current is not None
        try:
            store.write(
                "experiments",
                {"n": current.body["n"] + 1},
                expected_version=current.version,
                author="proc",
            )
            done += 1
        except VersionConflict:
            pass


def test_writers_in_separate_processes_lose_nothing(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.write("experiments", {"n": 0}, expected_version=0, author="init")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_increment, args=(str(tmp_path), 10)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    final = store.read("experiments")
    assert final is not None
    assert final.body == {"n": 30}
    assert final.version == 31
