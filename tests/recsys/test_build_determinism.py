"""`recsys build`: same seed, same version ids; manifests say what each version was built from."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.artifacts import read_manifest, verify
from recsys.build import BuildReport, build
from recsys.cli.main import main
from tests.conftest import SMALL_WORLD


def test_the_same_seed_builds_the_same_versions(
    built_world: tuple[Path, BuildReport], tmp_path: Path
) -> None:
    _, first = built_world
    second = build(
        SMALL_WORLD.__class__(**{**SMALL_WORLD.__dict__, "out": tmp_path}), say=lambda _m: None
    )
    assert (second.world_version, second.features_version) == (
        first.world_version,
        first.features_version,
    )
    assert (second.index_version, second.model_version) == (
        first.index_version,
        first.model_version,
    )


def test_every_artifact_has_a_verified_manifest_naming_its_inputs(
    built_world: tuple[Path, BuildReport],
) -> None:
    root, report = built_world
    world = verify(root / "world" / report.world_version)
    features = verify(root / "features" / report.features_version)
    index = verify(root / "indexes" / report.index_version)
    model = verify(root / "models" / "ranker" / report.model_version)
    assert world["seed"] == SMALL_WORLD.seed
    assert features["world_version"] == report.world_version
    assert index["features_version"] == report.features_version
    assert model["features_version"] == report.features_version
    assert model["world_version"] == report.world_version
    assert read_manifest(root / "models" / "ranker" / report.model_version)["content_hash"]


def test_the_ranker_beats_popularity_and_retrieval_order_offline(
    built_world: tuple[Path, BuildReport],
) -> None:
    metrics = built_world[1].offline_metrics
    assert metrics["ndcg@20.ranker"] > metrics["ndcg@20.retrieval"]
    assert metrics["ndcg@20.ranker"] > metrics["ndcg@20.popularity"]


def test_build_if_missing_skips_a_built_root(
    built_world: tuple[Path, BuildReport], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["build", "--out", str(built_world[0]), "--if-missing"]) == 0
    assert "already built" in capsys.readouterr().out


def test_bad_build_flags_name_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", "--skus", "5"]) == 2
    assert "--skus: expected at least" in capsys.readouterr().err
