from __future__ import annotations

import importlib.util
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from recsys.ranking.features import FEATURE_NAMES, FeatureTables, build_feature_tables
from recsys.ranking.training import RankerParams, TrainedRanker, train_ranker
from recsys.world import World
from tests.ranking.conftest import SMALL_PARAMS

MARGIN = 0.02
"""How much NDCG@20 the ranker must gain over the best baseline to count as clearly better."""


def test_ranker_beats_popularity_and_retrieval(trained: TrainedRanker) -> None:
    m = trained.metrics
    ranker = m["ndcg@20.ranker"]
    assert ranker > m["ndcg@20.popularity"] + MARGIN, m
    assert ranker > m["ndcg@20.retrieval"] + MARGIN, m
    assert 0.0 < ranker < 1.0


def test_metrics_and_counts(trained: TrainedRanker, world: World) -> None:
    m = trained.metrics
    for key in ("train_rows", "train_groups", "validation_groups", "eval_rows", "eval_groups"):
        assert m[key] > 0, key
    assert 0 < m["eval_groups_with_click"] < m["eval_groups"]
    assert 1 <= m["best_iteration"] <= SMALL_PARAMS.num_trees
    assert trained.booster.num_trees() == m["best_iteration"]
    recent_rows = int((~world.history_mask()).sum())
    # Training keeps only clicked sessions; held-out rows are all kept for evaluation.
    assert m["train_rows"] + m["eval_rows"] < recent_rows
    heldout_rows = int(world.heldout_user_mask()[world.log.user[~world.history_mask()]].sum())
    assert m["eval_rows"] == heldout_rows


def test_feature_importance_finds_the_planted_signal(trained: TrainedRanker) -> None:
    importance = trained.feature_importance
    assert list(importance) == list(FEATURE_NAMES)
    assert sum(importance.values()) == pytest.approx(1.0)
    top_two = sorted(importance, key=importance.__getitem__, reverse=True)[:2]
    assert set(top_two) == {"mf_score", "distance_km"}


def test_golden_rows_and_baseline(trained: TrainedRanker) -> None:
    assert trained.golden_features.shape == (64, len(FEATURE_NAMES))
    assert trained.golden_features.dtype == np.float32
    assert len({row.tobytes() for row in trained.golden_features}) > 1
    baseline: dict[str, Any] = trained.baseline
    assert set(baseline["features"]) == set(FEATURE_NAMES)
    assert baseline["features"]["cuisine"]["kind"] == "categorical"
    assert sum(baseline["score"]["counts"]) == baseline["rows"]


def test_training_is_deterministic(
    world: World, tables: FeatureTables, trained: TrainedRanker
) -> None:
    again = train_ranker(world, tables, SMALL_PARAMS)
    assert again.booster.model_to_string() == trained.booster.model_to_string()
    assert again.train_fingerprint == trained.train_fingerprint
    assert again.metrics == trained.metrics
    np.testing.assert_array_equal(again.golden_features, trained.golden_features)


def test_heldout_users_never_reach_training(
    world: World, tables: FeatureTables, trained: TrainedRanker
) -> None:
    """Rewriting the held-out users' recent labels changes the evaluation, never the model."""
    log = world.log
    heldout_recent = world.heldout_user_mask()[log.user] & ~world.history_mask()
    clicked = np.where(heldout_recent, ~log.clicked, log.clicked)
    ordered = np.where(heldout_recent, False, log.ordered)
    other = replace(world, log=replace(log, clicked=clicked, ordered=ordered))
    result = train_ranker(other, tables, SMALL_PARAMS)
    assert result.train_fingerprint == trained.train_fingerprint
    assert result.booster.model_to_string() == trained.booster.model_to_string()
    assert result.metrics["ndcg@20.ranker"] != trained.metrics["ndcg@20.ranker"]


def test_seed_changes_the_validation_split(
    world: World, tables: FeatureTables, trained: TrainedRanker
) -> None:
    other = train_ranker(world, tables, SMALL_PARAMS, seed=SMALL_PARAMS.seed + 1)
    assert other.params.seed == SMALL_PARAMS.seed + 1
    assert other.train_fingerprint != trained.train_fingerprint


def test_refuses_a_world_without_clicks(world: World, tables: FeatureTables) -> None:
    none = np.zeros(world.log.n_rows, dtype=bool)
    silent = replace(world, log=replace(world.log, clicked=none, ordered=none))
    with pytest.raises(ValueError, match="too few clicked sessions"):
        train_ranker(silent, tables, SMALL_PARAMS)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_trees": 0}, "num_trees must be > 0"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
        ({"num_leaves": 1}, "num_leaves must be >= 2"),
        ({"feature_fraction": 1.5}, r"feature_fraction must be in \(0, 1\]"),
        ({"validation_fraction": 1.0}, r"validation_fraction must be in \(0, 1\)"),
        ({"num_threads": 0}, "num_threads must be > 0"),
        ({"max_bin": 1}, "max_bin >= 2"),
    ],
)
def test_params_are_validated(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RankerParams(**change)


@pytest.mark.skipif(
    importlib.util.find_spec("recsys.worldgen") is None
    or importlib.util.find_spec("recsys.retrieval.embeddings") is None,
    reason="needs recsys.worldgen and recsys.retrieval.embeddings",
)
def test_ranker_beats_baselines_on_a_generated_world() -> None:
    from recsys.retrieval.embeddings import learn_embeddings
    from recsys.worldgen import generate_world

    world = generate_world(4_000, 1_500, seed=5)
    emb = learn_embeddings(world, dim=16, seed=5)
    tables = build_feature_tables(world, emb.user_vectors, emb.item_vectors)
    m = train_ranker(world, tables, RankerParams()).metrics
    assert m["ndcg@20.ranker"] > m["ndcg@20.popularity"] + MARGIN, m
    assert m["ndcg@20.ranker"] > m["ndcg@20.retrieval"] + MARGIN, m
