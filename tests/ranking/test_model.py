from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pytest

from recsys.artifacts import MANIFEST, ArtifactRoot, file_hashes
from recsys.ranking.features import FEATURE_NAMES, FeatureTables, assemble_features
from recsys.ranking.model import (
    MODEL_FILE,
    ModelRejected,
    RankingModel,
    load_model,
    load_model_version,
    save_model_version,
)
from recsys.ranking.training import TrainedRanker
from tests.ranking.conftest import SMALL_PARAMS
from tests.ranking.test_features import serving_batch


def save(root: ArtifactRoot, trained: TrainedRanker, tables: FeatureTables) -> str:
    return save_model_version(
        root,
        "ranker",
        trained,
        tables,
        features_version="feat0001",
        world_version="world0001",
        params=SMALL_PARAMS,
    )


@pytest.fixture(scope="module")
def published(
    tmp_path_factory: pytest.TempPathFactory, trained: TrainedRanker, tables: FeatureTables
) -> Path:
    root = ArtifactRoot(tmp_path_factory.mktemp("artifacts"))
    return root.models("ranker") / save(root, trained, tables)


@pytest.fixture(scope="module")
def model(published: Path) -> RankingModel:
    return load_model(published)


@pytest.fixture
def copy(published: Path, tmp_path: Path) -> Path:
    """A private copy of the published version, free to corrupt."""
    return Path(shutil.copytree(published, tmp_path / published.name))


def edit_manifest(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    manifest = json.loads((directory / MANIFEST).read_text())
    change(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest))


def replace_model_text(directory: Path, text: str) -> None:
    """Write a new model.txt *and* its hash, as a buggy writer would: only the checks after
    the hash check can catch it."""
    (directory / MODEL_FILE).write_text(text)
    edit_manifest(directory, lambda m: m.update(files=file_hashes(directory)))


def test_round_trip_scores_like_the_trained_booster(
    model: RankingModel, trained: TrainedRanker, tables: FeatureTables
) -> None:
    x = assemble_features(tables, *serving_batch(tables, 2_000))
    scores = model.predict(x)
    assert scores.dtype == np.float32
    assert scores.shape == (2_000,)
    np.testing.assert_allclose(scores, trained.booster.predict(x), rtol=1e-6, atol=1e-6)
    assert model.name == "ranker"
    assert re.fullmatch(r"[0-9a-f]{12}", model.version)
    assert model.feature_names == FEATURE_NAMES


def test_manifest_describes_the_model(model: RankingModel, trained: TrainedRanker) -> None:
    m = model.manifest
    assert m["feature_schema"]["names"] == list(FEATURE_NAMES)
    assert m["feature_schema"]["categorical"] == ["cuisine", "category"]
    assert m["feature_schema"]["types"]["cuisine"] == "categorical"
    assert m["feature_schema"]["types"]["distance_km"] == "numeric"
    assert m["train_fingerprint"] == trained.train_fingerprint
    assert m["params"]["seed"] == SMALL_PARAMS.seed
    assert m["features_version"] == "feat0001"
    assert m["world_version"] == "world0001"
    assert m["metrics"] == trained.metrics
    assert model.metrics["ndcg@20.ranker"] == trained.metrics["ndcg@20.ranker"]
    assert m["code_version"].startswith("0.1.0+src.")
    assert len(m["golden"]["features"]) == 64
    assert len(m["golden"]["scores"]) == 64
    assert set(m["baseline"]["features"]) == set(FEATURE_NAMES)
    assert sum(m["baseline"]["score"]["counts"]) == m["baseline"]["rows"]
    assert list(m["files"]) == [MODEL_FILE]


def test_saving_again_gives_the_same_version(
    published: Path, trained: TrainedRanker, tables: FeatureTables
) -> None:
    root = ArtifactRoot(published.parents[2])
    assert save(root, trained, tables) == published.name
    assert load_model_version(root, "ranker", published.name).version == published.name


def test_predict_checks_the_shape(model: RankingModel) -> None:
    assert model.predict(np.zeros((0, len(FEATURE_NAMES)), dtype=np.float32)).shape == (0,)
    with pytest.raises(ValueError, match=r"features has shape \(3, 5\), expected \(rows, 16\)"):
        model.predict(np.zeros((3, 5), dtype=np.float32))


def test_predict_is_thread_safe(model: RankingModel, tables: FeatureTables) -> None:
    batches = [assemble_features(tables, *serving_batch(tables, 300, seed)) for seed in range(8)]
    expected = [model.predict(x) for x in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(5):
            results = list(pool.map(model.predict, batches))
            for got, want in zip(results, expected, strict=True):
                np.testing.assert_array_equal(got, want)


# Each refusal: corrupt one thing, and the message must say what.


def test_refuses_a_directory_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(ModelRejected, match="no manifest"):
        load_model(tmp_path)


def test_refuses_an_unknown_version(published: Path) -> None:
    root = ArtifactRoot(published.parents[2])
    with pytest.raises(ModelRejected, match="no such model version of 'ranker'"):
        load_model_version(root, "ranker", "000000000000")


def test_refuses_a_changed_model_file(copy: Path) -> None:
    with (copy / MODEL_FILE).open("a") as f:
        f.write("\n")
    with pytest.raises(ModelRejected, match=r"changed \['model.txt'\]"):
        load_model(copy)


def test_refuses_a_missing_model_file(copy: Path) -> None:
    (copy / MODEL_FILE).unlink()
    with pytest.raises(ModelRejected, match=r"missing \['model.txt'\]"):
        load_model(copy)


def test_refuses_unexpected_files(copy: Path) -> None:
    (copy / "notes.txt").write_text("hi")
    with pytest.raises(ModelRejected, match=r"unexpected \['notes.txt'\]"):
        load_model(copy)


def test_refuses_another_kind_of_artifact(copy: Path) -> None:
    edit_manifest(copy, lambda m: m.update(kind="faiss-index"))
    with pytest.raises(ModelRejected, match="kind/format is 'faiss-index'"):
        load_model(copy)


def test_refuses_a_schema_with_other_features(copy: Path) -> None:
    def drop_last(m: dict[str, Any]) -> None:
        m["feature_schema"]["names"] = [*FEATURE_NAMES[:-1], "dish_colour"]

    edit_manifest(copy, drop_last)
    with pytest.raises(
        ModelRejected, match=r"missing \['category'\], unexpected \['dish_colour'\]"
    ):
        load_model(copy)


def test_refuses_a_schema_in_another_order(copy: Path) -> None:
    def swap(m: dict[str, Any]) -> None:
        names = list(FEATURE_NAMES)
        names[0], names[1] = names[1], names[0]
        m["feature_schema"]["names"] = names

    edit_manifest(copy, swap)
    with pytest.raises(ModelRejected, match="same names in another order"):
        load_model(copy)


def test_refuses_other_categorical_features(copy: Path) -> None:
    edit_manifest(copy, lambda m: m["feature_schema"].update(categorical=["cuisine"]))
    with pytest.raises(ModelRejected, match=r"categorical features \['cuisine'\]"):
        load_model(copy)


def test_refuses_golden_scores_that_do_not_reproduce(copy: Path) -> None:
    def nudge(m: dict[str, Any]) -> None:
        m["golden"]["scores"][5] += 1e-3

    edit_manifest(copy, nudge)
    with pytest.raises(ModelRejected, match="golden scores do not reproduce \\(row 5"):
        load_model(copy)


def test_refuses_a_model_whose_trees_changed(copy: Path) -> None:
    text = (copy / MODEL_FILE).read_text()
    first_leaf_values = re.search(r"leaf_value=([^\n]*)", text)
    assert first_leaf_values is not None
    shifted = " ".join(str(float(v) + 0.5) for v in first_leaf_values.group(1).split())
    replace_model_text(copy, text.replace(first_leaf_values.group(0), f"leaf_value={shifted}", 1))
    with pytest.raises(ModelRejected, match="golden scores do not reproduce"):
        load_model(copy)


def test_refuses_a_model_that_scores_nan(copy: Path) -> None:
    text = (copy / MODEL_FILE).read_text()
    nan_leaves = re.sub(
        r"leaf_value=([^\n]*)",
        lambda match: "leaf_value=" + " ".join("nan" for _ in match.group(1).split()),
        text,
        count=1,
    )
    replace_model_text(copy, nan_leaves)
    with pytest.raises(ModelRejected, match="scores NaN on 64 golden rows"):
        load_model(copy)


def test_refuses_text_that_is_not_a_model(copy: Path) -> None:
    replace_model_text(copy, "this is not a model\n")
    with pytest.raises(ModelRejected, match=r"model\.txt: not a LightGBM model"):
        load_model(copy)


def test_refuses_trees_over_other_features(copy: Path) -> None:
    text = (copy / MODEL_FILE).read_text()
    renamed = text.replace("feature_names=mf_score ", "feature_names=random_score ", 1)
    replace_model_text(copy, renamed)
    with pytest.raises(ModelRejected, match=r"the trees use features \['random_score'"):
        load_model(copy)


def test_refuses_malformed_golden_inputs(copy: Path) -> None:
    edit_manifest(copy, lambda m: m["golden"].update(scores=m["golden"]["scores"][:10]))
    with pytest.raises(ModelRejected, match="10 golden scores for 64 golden rows"):
        load_model(copy)


def test_model_name_must_be_a_plain_name(
    tmp_path: Path, trained: TrainedRanker, tables: FeatureTables
) -> None:
    with pytest.raises(ValueError, match=r"model name '\.\./x'"):
        save_model_version(
            ArtifactRoot(tmp_path),
            "../x",
            trained,
            tables,
            features_version="f",
            world_version="w",
            params=SMALL_PARAMS,
        )


def test_loaded_booster_is_the_saved_text(published: Path, model: RankingModel) -> None:
    text = (published / MODEL_FILE).read_text()
    assert isinstance(model.booster, lgb.Booster)
    assert model.booster.num_trees() == lgb.Booster(model_str=text).num_trees()
