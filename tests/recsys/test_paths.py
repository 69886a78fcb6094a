"""Names and versions reach the filesystem only as ids, and only inside the artifact root.

Every model name and every version (model, index, features, world) that becomes a path is
checked against the one id pattern in recsys/artifacts.py, and the resolved path must stay inside
the root; a refusal is an ArtifactError naming the field and what was expected.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from recsys.artifacts import MANIFEST, ArtifactError, ArtifactRoot, publish, staging, versions
from recsys.build import BuildReport
from recsys.ranking.model import ModelRejected, RankingModel, load_model_version

BAD_IDS = ["..", ".", "../x", "a/b", "../../victim", "", ".hidden", "Ranker", "x" * 65, "a\0b"]


def _publish(parent: Path, files: dict[str, str], manifest: dict[str, Any]) -> str:
    with staging(parent) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)
        version, _ = publish(tmp, parent, manifest)
    return version


@pytest.mark.parametrize("name", BAD_IDS)
def test_a_model_name_that_is_not_an_id_is_refused_naming_the_field(
    tmp_path: Path, name: str
) -> None:
    with pytest.raises(ArtifactError, match=r"^model name .*: expected "):
        ArtifactRoot(tmp_path).models(name)


@pytest.mark.parametrize("name", ["ranker", "ranker-b", "ranker_2", "0", "a" * 64])
def test_a_plain_model_name_is_a_directory_under_models(tmp_path: Path, name: str) -> None:
    assert ArtifactRoot(tmp_path).models(name) == tmp_path / "models" / name


@pytest.mark.parametrize("version", BAD_IDS)
def test_a_model_version_that_is_not_an_id_is_refused_as_missing(
    tmp_path: Path, version: str
) -> None:
    with pytest.raises(ModelRejected, match=r"model version .*: expected ") as raised:
        load_model_version(ArtifactRoot(tmp_path), "ranker", version)
    assert raised.value.reason == "missing"


@pytest.mark.parametrize("version", ["../models", "../../outside", "a/b", ".."])
def test_lineage_refuses_an_index_version_that_is_not_an_id(tmp_path: Path, version: str) -> None:
    with pytest.raises(ArtifactError, match=r"^index version .*: expected "):
        ArtifactRoot(tmp_path).lineage(version)


def test_lineage_refuses_a_features_version_in_a_manifest_that_climbs_out(tmp_path: Path) -> None:
    root = ArtifactRoot(tmp_path)
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / MANIFEST).write_text(json.dumps({"world_version": "w"}))
    escape = f"../../{outside.name}"
    assert (root.features / escape).resolve() == outside.resolve()
    index = _publish(root.indexes, {"i.faiss": "i"}, {"features_version": escape})

    with pytest.raises(ArtifactError, match=r"features_version .*: expected "):
        root.lineage(index)


def test_lineage_refuses_a_world_version_in_a_manifest_that_climbs_out(tmp_path: Path) -> None:
    root = ArtifactRoot(tmp_path)
    features = _publish(root.features, {"f.npy": "f"}, {"world_version": "../indexes"})
    index = _publish(root.indexes, {"i.faiss": "i"}, {"features_version": features})

    with pytest.raises(ArtifactError, match=re.escape("world_version '../indexes': expected ")):
        root.lineage(index)


def test_a_symlink_out_of_the_root_is_refused(tmp_path: Path) -> None:
    root = ArtifactRoot(tmp_path / "root")
    outside = tmp_path / "outside"
    (outside / "v").mkdir(parents=True)
    (root.path / "models").mkdir(parents=True)
    (root.path / "models" / "ranker").symlink_to(outside, target_is_directory=True)

    with pytest.raises(ArtifactError, match="outside the artifact root"):
        root.models("ranker")


def test_listings_skip_directories_whose_names_are_not_ids(tmp_path: Path) -> None:
    root = ArtifactRoot(tmp_path)
    version = _publish(root.models("ranker"), {"model.txt": "m"}, {})
    (root.path / "models" / "Not An Id").mkdir()
    retired = root.models("ranker") / f".retired-{version}-1"
    retired.mkdir()
    (retired / MANIFEST).write_text("{}")

    assert root.model_versions() == {"ranker": [version]}
    assert versions(root.models("ranker")) == [version]


def test_a_loaded_model_whose_manifest_names_a_path_is_refused(
    artifacts: Path, built_world: tuple[Path, BuildReport]
) -> None:
    """The manifest is not covered by its own hashes: its name and version are checked before
    they name the compiled cache directory."""
    root = ArtifactRoot(artifacts)
    directory = root.models("ranker") / built_world[1].model_version
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["version"] = "../../../escaped"
    (directory / MANIFEST).write_text(json.dumps(manifest))

    with pytest.raises(ModelRejected, match=r"model version '\.\./\.\./\.\./escaped': expected"):
        load_model_version(root, "ranker", built_world[1].model_version)


def test_a_model_built_by_hand_with_a_path_for_a_name_does_not_compile_outside(
    artifacts: Path, built_world: tuple[Path, BuildReport], tmp_path: Path
) -> None:
    from dataclasses import replace

    from recsys.ranking.compiled import CompileError

    root = ArtifactRoot(artifacts)
    model: RankingModel = load_model_version(root, "ranker", built_world[1].model_version)
    escaped = replace(model, name="../../escaped")
    assert (root.path / "compiled" / escaped.name).resolve() == (tmp_path / "escaped").resolve()

    with pytest.raises(CompileError, match="model name"):
        escaped.with_compiled(root.path / "compiled")
    assert not (tmp_path / "escaped").exists()
