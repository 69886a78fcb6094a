"""The artifact root: content-addressed immutable versions, manifests, and lineage."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from recsys.artifacts import (
    MANIFEST,
    VERSION_DIGITS,
    ArtifactError,
    ArtifactRoot,
    content_hash,
    file_hashes,
    publish,
    read_manifest,
    sha256_file,
    staging,
    verify,
    versions,
)


def _publish(
    parent: Path, files: dict[str, str], manifest: dict[str, Any] | None = None
) -> tuple[str, Path]:
    """Stage ``files`` (relative path -> text) next to ``parent`` and publish them there."""
    with staging(parent.parent) as staged:
        for name, text in files.items():
            path = staged / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return publish(staged, parent, manifest or {})


def _set_mtime(directory: Path, seconds: float) -> None:
    os.utime(directory, (seconds, seconds))


# -- publish and staging -------------------------------------------------------------------------


def test_a_published_version_is_the_content_hash_prefix_and_holds_the_files(
    tmp_path: Path,
) -> None:
    version, path = _publish(tmp_path / "things", {"a.txt": "alpha", "sub/b.txt": "beta"})

    hashes = file_hashes(path)
    assert hashes == {
        "a.txt": sha256_file(path / "a.txt"),
        "sub/b.txt": sha256_file(path / "sub/b.txt"),
    }
    assert version == content_hash(hashes)[:VERSION_DIGITS]
    assert re.fullmatch(r"[0-9a-f]{12}", version)
    assert path == tmp_path / "things" / version
    assert (path / "a.txt").read_text() == "alpha"
    assert (path / "sub/b.txt").read_text() == "beta"


def test_the_manifest_records_version_content_hash_files_and_the_callers_fields(
    tmp_path: Path,
) -> None:
    version, path = _publish(tmp_path / "things", {"a.txt": "alpha"}, {"kind": "demo", "n": 3})

    manifest = read_manifest(path)
    assert manifest["kind"] == "demo"
    assert manifest["n"] == 3
    assert manifest["version"] == version
    assert manifest["content_hash"] == content_hash(file_hashes(path))
    assert manifest["files"] == {"a.txt": sha256_file(path / "a.txt")}


def test_publishing_the_same_content_twice_returns_the_same_version(tmp_path: Path) -> None:
    first = _publish(tmp_path / "things", {"a.txt": "alpha", "b.txt": "beta"})
    second = _publish(tmp_path / "things", {"b.txt": "beta", "a.txt": "alpha"})

    assert first == second
    assert versions(tmp_path / "things") == [first[0]]


def test_publishing_the_same_content_again_leaves_the_existing_version_untouched(
    tmp_path: Path,
) -> None:
    version, path = _publish(tmp_path / "things", {"a.txt": "alpha"}, {"note": "first"})
    before = (path / MANIFEST).read_text()

    again, _ = _publish(tmp_path / "things", {"a.txt": "alpha"}, {"note": "second"})

    assert again == version
    assert (path / MANIFEST).read_text() == before
    assert read_manifest(path)["note"] == "first"


def test_different_content_gets_a_different_version(tmp_path: Path) -> None:
    first, _ = _publish(tmp_path / "things", {"a.txt": "alpha"})
    second, _ = _publish(tmp_path / "things", {"a.txt": "alpha!"})

    assert first != second


def test_the_same_bytes_under_another_file_name_get_a_different_version(tmp_path: Path) -> None:
    first, _ = _publish(tmp_path / "things", {"a.txt": "alpha"})
    second, _ = _publish(tmp_path / "things", {"b.txt": "alpha"})

    assert first != second


def test_the_manifest_fields_do_not_change_the_version(tmp_path: Path) -> None:
    first, _ = _publish(tmp_path / "one", {"a.txt": "alpha"}, {"note": "x"})
    second, _ = _publish(tmp_path / "two", {"a.txt": "alpha"}, {"note": "y"})

    assert first == second


def test_a_staging_directory_lives_under_the_root_and_is_removed_if_not_published(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    with staging(root) as staged:
        (staged / "a.txt").write_text("alpha")
        assert staged.parent == root
        assert staged.name.startswith(".staging-")
        assert staged.is_dir()

    assert not staged.exists()
    assert list(root.iterdir()) == []


def test_a_staging_directory_is_removed_when_the_block_raises(tmp_path: Path) -> None:
    seen: list[Path] = []

    def fail_while_staging() -> None:
        with staging(tmp_path) as staged:
            seen.append(staged)
            (staged / "a.txt").write_text("alpha")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_while_staging()

    assert len(seen) == 1
    assert not seen[0].exists()


def test_a_published_version_survives_the_end_of_its_staging_block(tmp_path: Path) -> None:
    with staging(tmp_path) as staged:
        (staged / "a.txt").write_text("alpha")
        version, path = publish(staged, tmp_path / "things", {})

    assert not staged.exists()
    assert path.is_dir()
    assert verify(path)["version"] == version


def test_unpublished_staging_directories_are_not_versions(tmp_path: Path) -> None:
    with staging(tmp_path / "things") as staged:
        (staged / "a.txt").write_text("alpha")
        assert versions(tmp_path / "things") == []


# -- verify and read_manifest --------------------------------------------------------------------


def test_verify_returns_the_manifest_of_an_intact_version(tmp_path: Path) -> None:
    version, path = _publish(tmp_path / "things", {"a.txt": "alpha"}, {"kind": "demo"})

    manifest = verify(path)

    assert manifest == read_manifest(path)
    assert manifest["version"] == version


def test_verify_names_a_changed_file(tmp_path: Path) -> None:
    _, path = _publish(tmp_path / "things", {"a.txt": "alpha", "b.txt": "beta"})
    (path / "a.txt").write_text("tampered")

    with pytest.raises(
        ArtifactError, match=re.escape("(missing [], changed ['a.txt'], unexpected [])")
    ):
        verify(path)


def test_verify_names_a_missing_file(tmp_path: Path) -> None:
    _, path = _publish(tmp_path / "things", {"a.txt": "alpha", "sub/b.txt": "beta"})
    (path / "sub/b.txt").unlink()

    with pytest.raises(
        ArtifactError, match=re.escape("(missing ['sub/b.txt'], changed [], unexpected [])")
    ):
        verify(path)


def test_verify_names_an_unexpected_extra_file(tmp_path: Path) -> None:
    _, path = _publish(tmp_path / "things", {"a.txt": "alpha"})
    (path / "extra.txt").write_text("surprise")

    with pytest.raises(
        ArtifactError, match=re.escape("(missing [], changed [], unexpected ['extra.txt'])")
    ):
        verify(path)


def test_verify_names_the_directory_that_does_not_match(tmp_path: Path) -> None:
    _, path = _publish(tmp_path / "things", {"a.txt": "alpha"})
    (path / "a.txt").write_text("tampered")

    with pytest.raises(ArtifactError, match=re.escape(f"{path}: files do not match the manifest")):
        verify(path)


def test_read_manifest_of_a_directory_without_one_says_it_is_not_a_version(
    tmp_path: Path,
) -> None:
    with pytest.raises(
        ArtifactError, match=re.escape(f"{tmp_path / MANIFEST}: no manifest; not an artifact")
    ):
        read_manifest(tmp_path)


def test_read_manifest_of_invalid_json_says_so(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_text("{not json")

    with pytest.raises(
        ArtifactError, match=re.escape(f"{tmp_path / MANIFEST}: manifest is not valid JSON")
    ):
        read_manifest(tmp_path)


def test_verify_of_a_directory_without_a_manifest_raises(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha")

    with pytest.raises(ArtifactError, match="no manifest"):
        verify(tmp_path)


# -- versions, latest, model_versions ------------------------------------------------------------


def test_versions_of_a_missing_directory_is_empty(tmp_path: Path) -> None:
    assert versions(tmp_path / "nothing-here") == []


def test_versions_are_listed_oldest_first_by_modification_time(tmp_path: Path) -> None:
    parent = tmp_path / "things"
    older, older_path = _publish(parent, {"a.txt": "one"})
    newer, newer_path = _publish(parent, {"a.txt": "two"})
    _set_mtime(older_path, 2_000_000)
    _set_mtime(newer_path, 1_000_000)

    assert versions(parent) == [newer, older]

    _set_mtime(newer_path, 3_000_000)
    assert versions(parent) == [older, newer]


def test_latest_is_the_most_recently_published_version(tmp_path: Path) -> None:
    root = ArtifactRoot(tmp_path)
    _, first = _publish(root.indexes, {"a.txt": "one"})
    _, second = _publish(root.indexes, {"a.txt": "two"})
    _set_mtime(first, 1_000_000)
    _set_mtime(second, 2_000_000)

    assert root.latest(root.indexes) == second


def test_latest_without_any_version_raises_naming_the_directory(tmp_path: Path) -> None:
    root = ArtifactRoot(tmp_path)

    with pytest.raises(ArtifactError, match=re.escape(f"{root.indexes}: no published version")):
        root.latest(root.indexes)


def test_model_versions_without_a_models_directory_is_empty(tmp_path: Path) -> None:
    assert ArtifactRoot(tmp_path).model_versions() == {}


def test_model_versions_lists_every_name_with_its_versions_oldest_first(tmp_path: Path) -> None:
    root = ArtifactRoot(tmp_path)
    a1, a1_path = _publish(root.models("ranker"), {"model.txt": "a1"})
    a2, a2_path = _publish(root.models("ranker"), {"model.txt": "a2"})
    b1, _ = _publish(root.models("alt"), {"model.txt": "b1"})
    root.models("empty").mkdir(parents=True)
    (root.models("ranker") / "not-a-version").mkdir()
    _set_mtime(a1_path, 2_000_000)
    _set_mtime(a2_path, 1_000_000)

    found = root.model_versions()

    assert found == {"alt": [b1], "empty": [], "ranker": [a2, a1]}
    assert list(found) == ["alt", "empty", "ranker"]


# -- lineage -------------------------------------------------------------------------------------


def _chain(root: ArtifactRoot) -> tuple[str, str, str]:
    """A world, a features version built from it, and an index built from those features."""
    world, _ = _publish(root.world, {"world.json": "{}"}, {"kind": "world"})
    features, _ = _publish(root.features, {"f.npy": "f"}, {"world_version": world})
    index, _ = _publish(root.indexes, {"i.faiss": "i"}, {"features_version": features})
    return world, features, index


def test_lineage_names_the_features_and_world_an_index_was_built_from(tmp_path: Path) -> None:
    root = ArtifactRoot(tmp_path)
    world, features, index = _chain(root)

    lineage = root.lineage(index)

    assert lineage.index_version == index
    assert lineage.features_version == features
    assert lineage.world_version == world
    assert lineage.index_dir == root.indexes / index
    assert lineage.features_dir == root.features / features
    assert lineage.world_dir == root.world / world


def test_lineage_of_an_unknown_index_names_its_missing_manifest(tmp_path: Path) -> None:
    root = ArtifactRoot(tmp_path)

    with pytest.raises(
        ArtifactError, match=re.escape(f"{root.indexes / 'nosuch' / MANIFEST}: no manifest")
    ):
        root.lineage("nosuch")


def test_lineage_of_an_index_whose_features_version_is_missing_names_that_manifest(
    tmp_path: Path,
) -> None:
    root = ArtifactRoot(tmp_path)
    index, _ = _publish(root.indexes, {"i.faiss": "i"}, {"features_version": "gone"})

    with pytest.raises(
        ArtifactError, match=re.escape(f"{root.features / 'gone' / MANIFEST}: no manifest")
    ):
        root.lineage(index)


@pytest.mark.parametrize("value", [None, "", 12])
def test_lineage_of_an_index_without_a_features_version_names_the_field_and_manifest(
    tmp_path: Path, value: Any
) -> None:
    root = ArtifactRoot(tmp_path)
    manifest = {} if value is None else {"features_version": value}
    index, path = _publish(root.indexes, {"i.faiss": "i"}, manifest)

    with pytest.raises(
        ArtifactError,
        match=re.escape(f"{path / MANIFEST}: expected a 'features_version' string, got {value!r}"),
    ):
        root.lineage(index)


def test_lineage_of_features_without_a_world_version_names_the_field_and_manifest(
    tmp_path: Path,
) -> None:
    root = ArtifactRoot(tmp_path)
    features, features_path = _publish(root.features, {"f.npy": "f"}, {"kind": "features"})
    index, _ = _publish(root.indexes, {"i.faiss": "i"}, {"features_version": features})

    with pytest.raises(
        ArtifactError,
        match=re.escape(f"{features_path / MANIFEST}: expected a 'world_version' string"),
    ):
        root.lineage(index)


def test_lineage_of_an_index_with_an_unreadable_manifest_names_it(tmp_path: Path) -> None:
    root = ArtifactRoot(tmp_path)
    _, _, index = _chain(root)
    (root.indexes / index / MANIFEST).write_text("{truncated")

    with pytest.raises(
        ArtifactError, match=re.escape(f"{root.indexes / index / MANIFEST}: manifest is not valid")
    ):
        root.lineage(index)
