"""Snapshot ids and manifests: content-addressed, written once, private, checked on read."""

from __future__ import annotations

import json
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from recsys.pipeline.archive import SnapshotArchive, SnapshotArchiveError
from recsys.pipeline.snapshot import ControlDocument, ServingSnapshot, snapshot_id
from tests.serving.test_pipeline import state

__all__ = ["state"]


def test_the_id_changes_with_any_version_the_answers_depend_on(state: ServingSnapshot) -> None:
    base = snapshot_id(state.manifest())
    assert state.snapshot_id == base  # the compiler sealed it
    routing = state.documents["routing"]
    bumped = replace(
        state,
        documents={
            **state.documents,
            "routing": ControlDocument(routing.version + 1, routing.body),
        },
    )
    assert snapshot_id(bumped.manifest()) != base
    assert snapshot_id(replace(state, features_version="other").manifest()) != base
    assert snapshot_id(replace(state, models={}).manifest()) != base
    assert snapshot_id(replace(state).manifest()) == base


def test_a_manifest_is_written_once_private_and_read_back(
    state: ServingSnapshot, tmp_path: Path
) -> None:
    archive = SnapshotArchive(tmp_path / "snapshots")
    path = archive.write(state)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    mtime = path.stat().st_mtime_ns
    assert archive.write(state) == path
    assert path.stat().st_mtime_ns == mtime  # the same id is never rewritten
    manifest = archive.read(state.snapshot_id)
    assert manifest["index_version"] == state.index.version
    assert set(manifest["documents"]) == {"routing", "experiments", "availability"}
    assert manifest["models"] == {v: m.name for v, m in state.models.items()}


def test_a_changed_manifest_or_a_bad_id_is_refused(state: ServingSnapshot, tmp_path: Path) -> None:
    archive = SnapshotArchive(tmp_path)
    path = archive.write(state)
    manifest = json.loads(path.read_text())
    manifest["index_version"] = "tampered"
    path.write_text(json.dumps(manifest))
    with pytest.raises(SnapshotArchiveError, match="does not hash to its id"):
        archive.read(state.snapshot_id)
    with pytest.raises(SnapshotArchiveError, match="16 lowercase hex"):
        archive.read("../../etc/passwd")
    with pytest.raises(SnapshotArchiveError, match="no manifest"):
        archive.read("0" * 16)
