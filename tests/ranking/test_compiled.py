"""Compiled scoring: equal to LightGBM, cached by model and machine, LightGBM when it cannot be."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from recsys.artifacts import ArtifactRoot, read_manifest
from recsys.build import BuildReport
from recsys.ranking.compiled import (
    ENGINE_LIGHTGBM,
    ENGINE_LLEAVES,
    CompileError,
    cache_key,
    compile_model,
    library_versions,
)
from recsys.ranking.features import FEATURE_NAMES, assemble_features, load_feature_tables
from recsys.ranking.model import MODEL_FILE, RankingModel, load_model_version
from recsys.ranking.registry import load_for_serving
from recsys.world import load_world

NAME = "ranker"


@pytest.fixture
def root(built_world: tuple[Path, BuildReport], tmp_path: Path) -> ArtifactRoot:
    out = tmp_path / "artifacts"
    shutil.copytree(built_world[0], out, ignore=shutil.ignore_patterns("compiled", "exposures"))
    return ArtifactRoot(out)


@pytest.fixture
def model(root: ArtifactRoot, built_world: tuple[Path, BuildReport]) -> RankingModel:
    return load_model_version(root, NAME, built_world[1].model_version)


def _served_rows(root: ArtifactRoot, n: int) -> np.ndarray:
    """Feature rows the way serving builds them: real users, items, places and hours."""
    features = root.latest(root.features)
    world = load_world(root.world / str(read_manifest(features)["world_version"]))
    tables = load_feature_tables(features, world.catalogue)
    rng = np.random.default_rng(5)
    users = rng.integers(-1, tables.n_users, n).astype(np.int32)  # -1: an unknown user
    return assemble_features(
        tables,
        users,
        rng.integers(0, world.catalogue.n_items, n),
        rng.uniform(52.3, 52.7, n),
        rng.uniform(13.1, 13.7, n),
        rng.integers(0, 24, n).astype(np.int8),
    )


def test_compiled_scores_equal_lightgbm(root: ArtifactRoot, model: RankingModel) -> None:
    compiled = model.with_compiled(root.path / "compiled")
    assert compiled.engine == ENGINE_LLEAVES
    assert model.engine == ENGINE_LIGHTGBM
    rows = _served_rows(root, 3000)
    assert rows.shape[1] == len(FEATURE_NAMES)
    expected = model.predict(rows)
    actual = compiled.predict(rows)
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5)
    for n in (0, 1, 100, 500):
        np.testing.assert_allclose(compiled.predict(rows[:n]), expected[:n], rtol=0, atol=1e-5)


def test_the_binary_is_cached_by_model_and_machine(root: ArtifactRoot, model: RankingModel) -> None:
    cache = root.path / "compiled"
    first = model.with_compiled(cache)
    assert first.compiled is not None
    binary = first.compiled.binary
    assert binary.parent == cache / NAME / model.version
    assert binary.name == f"{cache_key(model.content_hash)}.bin"
    stamp = binary.stat().st_mtime_ns
    again = model.with_compiled(cache)  # loads the cached object file, compiles nothing
    assert again.compiled is not None
    assert again.compiled.binary == binary
    assert binary.stat().st_mtime_ns == stamp
    assert cache_key(model.content_hash) != cache_key("another model")
    assert set(library_versions()) == {"lleaves", "llvmlite"}


def test_a_damaged_cached_binary_is_recompiled_not_loaded(
    root: ArtifactRoot, model: RankingModel
) -> None:
    cache = root.path / "compiled"
    first = model.with_compiled(cache)
    assert first.compiled is not None
    binary = first.compiled.binary
    binary.write_bytes(binary.read_bytes()[:100])  # truncated
    again = model.with_compiled(cache)
    assert again.compiled is not None
    rows = _served_rows(root, 200)
    np.testing.assert_allclose(again.predict(rows), model.predict(rows), rtol=0, atol=1e-5)
    assert binary.stat().st_size > 100


def test_golden_mismatch_and_failures_raise(root: ArtifactRoot, model: RankingModel) -> None:
    golden = np.asarray(model.manifest["golden"]["features"], dtype=np.float32)
    scores = np.asarray(model.manifest["golden"]["scores"], dtype=np.float64)
    directory = root.models(NAME) / model.version
    cache = root.path / "compiled" / NAME / model.version
    with pytest.raises(CompileError, match="does not reproduce the golden scores"):
        compile_model(directory / MODEL_FILE, cache, model.content_hash, golden, scores + 0.5, 1e-5)
    with pytest.raises(CompileError, match="could not compile"):
        compile_model(directory / "missing.txt", cache, "x", golden, scores, 1e-5)


def test_serving_falls_back_to_lightgbm_when_compilation_fails(
    root: ArtifactRoot, model: RankingModel
) -> None:
    blocked = root.path / "compiled" / NAME
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("a file where the cache directory should be")
    served, note = load_for_serving(root, NAME, model.version)
    assert served.engine == ENGINE_LIGHTGBM
    assert note.startswith("lightgbm (compiled engine unavailable:")
    rows = _served_rows(root, 100)
    np.testing.assert_array_equal(served.predict(rows), model.predict(rows))
    off, note = load_for_serving(root, NAME, model.version, compile_models=False)
    assert off.engine == ENGINE_LIGHTGBM
    assert note == "lightgbm (compilation off)"
