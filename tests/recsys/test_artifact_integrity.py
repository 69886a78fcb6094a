"""World and feature arrays are checked against their manifests when a server loads them.

A flipped byte in a memory-mapped array would otherwise be served silently. Manifests record
sha256 (authoritative: the version id is derived from it) and xxh3-128 (fast, checked at load);
a manifest written before the fast hash existed still verifies with sha256.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from recsys.artifacts import MANIFEST, ArtifactError, ArtifactRoot, publish, staging, verify
from recsys.build import BuildReport
from recsys.pipeline.loading import IndexLoader, SnapshotError

FAST = "files_xxh3"


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _drop_fast_hashes(directory: Path) -> None:
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest.pop(FAST, None)
    (directory / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture
def report(built_world: tuple[Path, BuildReport]) -> BuildReport:
    return built_world[1]


@pytest.mark.parametrize(
    ("part", "file"),
    [("features", "user_vectors.npy"), ("features", "item_vectors.npy"),
     ("world", "catalogue.item_price.npy"), ("world", "users.user_ids.npy")],
)  # fmt: skip
def test_a_flipped_byte_in_a_served_array_is_refused_at_load_naming_the_file(
    artifacts: Path, report: BuildReport, part: str, file: str
) -> None:
    root = ArtifactRoot(artifacts)
    version = report.features_version if part == "features" else report.world_version
    _flip_one_byte(artifacts / part / version / file)

    with pytest.raises(ArtifactError, match=re.escape(f"changed ['{file}']")):
        root.lineage(report.index_version)
    with pytest.raises(SnapshotError, match=re.escape(f"changed ['{file}']")) as raised:
        IndexLoader(root).load(report.index_version)
    assert f"{part}/{version}" in str(raised.value)


def test_a_flipped_byte_is_caught_with_a_manifest_that_has_no_fast_hashes(
    artifacts: Path, report: BuildReport
) -> None:
    features = artifacts / "features" / report.features_version
    _drop_fast_hashes(features)
    IndexLoader(ArtifactRoot(artifacts)).load(report.index_version)  # old manifests still load
    _flip_one_byte(features / "user_vectors.npy")

    with pytest.raises(SnapshotError, match=re.escape("changed ['user_vectors.npy']")):
        IndexLoader(ArtifactRoot(artifacts)).load(report.index_version)


def test_a_missing_or_extra_file_is_refused_at_load(artifacts: Path, report: BuildReport) -> None:
    world = artifacts / "world" / report.world_version
    (world / "log.clicked.npy").unlink()
    (world / "stray.npy").write_bytes(b"")

    with pytest.raises(
        ArtifactError,
        match=re.escape("(missing ['log.clicked.npy'], changed [], unexpected ['stray.npy'])"),
    ):
        ArtifactRoot(artifacts).lineage(report.index_version)


def test_published_versions_record_both_hashes_of_the_same_files(
    artifacts: Path, report: BuildReport
) -> None:
    for part, version in (
        ("world", report.world_version),
        ("features", report.features_version),
        ("indexes", report.index_version),
        ("models/ranker", report.model_version),
    ):
        manifest = json.loads((artifacts / part / version / MANIFEST).read_text())
        assert set(manifest[FAST]) == set(manifest["files"]), part
        assert all(re.fullmatch("[0-9a-f]{32}", h) for h in manifest[FAST].values())
        assert all(re.fullmatch("[0-9a-f]{64}", h) for h in manifest["files"].values())


def test_the_version_id_does_not_depend_on_the_fast_hashes(tmp_path: Path) -> None:
    """Adding xxh3 to manifests changed no version id: ids hash the sha256 list only."""
    parent = tmp_path / "v"
    with staging(parent) as tmp:
        (tmp / "a.txt").write_text("a")
        version, path = publish(tmp, parent, {})
    # sha256 of the file list "a.txt\0<sha256 of 'a'>\n", as before the fast hash existed
    assert version == "68fc94621b84"
    assert verify(path)["version"] == version


def test_sha256_is_the_authority_when_only_it_was_rewritten(tmp_path: Path) -> None:
    """A writer that knows only sha256 (older code) rewrites a file and its sha256: the stale
    fast hash does not make the version fail, the sha256 decides."""
    parent = tmp_path / "v"
    with staging(parent) as tmp:
        (tmp / "a.txt").write_text("a")
        _, path = publish(tmp, parent, {})
    (path / "a.txt").write_text("b")
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"]["a.txt"] = "3e23e8160039594a33894f6564e1b1348bbd7a0088d42c4acb73eeaed59c009d"
    (path / MANIFEST).write_text(json.dumps(manifest))

    assert verify(path)["files"]["a.txt"] == manifest["files"]["a.txt"]

    (path / "a.txt").write_text("c")
    with pytest.raises(ArtifactError, match=re.escape("changed ['a.txt']")):
        verify(path)


def test_a_manifest_whose_fast_hashes_list_other_files_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "v"
    with staging(parent) as tmp:
        (tmp / "a.txt").write_text("a")
        _, path = publish(tmp, parent, {})
    manifest = json.loads((path / MANIFEST).read_text())
    manifest[FAST] = {"b.txt": "0" * 32}
    (path / MANIFEST).write_text(json.dumps(manifest))

    with pytest.raises(ArtifactError, match=f"{FAST} lists other files"):
        verify(path)
