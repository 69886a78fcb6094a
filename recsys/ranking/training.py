"""LightGBM lambdarank training on the recent window of the log, with offline evaluation.

Rows are the recent window's impressions (the history window only feeds the feature tables),
sessions are query groups, labels are 2 ordered / 1 clicked / 0 shown. Users in
``world.heldout_user_mask()`` never reach training: their sessions measure NDCG@k of the ranker
against the popularity and retrieval (mf_score) orders. A seeded slice of the remaining users
is the validation set for early stopping. Training is deterministic: the same world, tables
and params give a byte-identical model string.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import lightgbm as lgb
import numpy as np
import numpy.typing as npt

from recsys.ranking.evaluation import distribution_baseline, ndcg_at_k
from recsys.ranking.features import (
    CATEGORICAL_FEATURES,
    FEATURE_INDEX,
    FEATURE_NAMES,
    FeatureTables,
    assemble_features,
)
from recsys.world import World

GOLDEN_ROWS = 64
BASELINE_ROWS = 200_000
"""Training rows (a seeded sample) the feature and score distribution baseline describes."""

Progress = Callable[[str], None]


@dataclass(frozen=True)
class RankerParams:
    num_trees: int = 300
    """Upper bound on boosting rounds; early stopping on the validation users picks fewer."""
    learning_rate: float = 0.1
    """0.1 reaches the NDCG of 0.05 in about a third of the rounds on the default world."""
    num_leaves: int = 63
    min_data_in_leaf: int = 50
    feature_fraction: float = 0.9
    lambda_l2: float = 1.0
    max_bin: int = 255
    early_stopping_rounds: int = 30
    validation_fraction: float = 0.1
    """Share of the (non-held-out) training users whose sessions drive early stopping."""
    eval_at: int = 20
    num_threads: int = 1
    """Fixed for determinism. One thread: on a busy 2-core machine OpenMP's two threads spin
    against other processes and train several times slower than one."""
    seed: int = 7

    def __post_init__(self) -> None:
        positive = ("num_trees", "learning_rate", "min_data_in_leaf", "eval_at", "num_threads")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"RankerParams.{name} must be > 0, got {getattr(self, name)}")
        if self.num_leaves < 2:
            raise ValueError(f"RankerParams.num_leaves must be >= 2, got {self.num_leaves}")
        if not 0.0 < self.feature_fraction <= 1.0:
            raise ValueError(
                f"RankerParams.feature_fraction must be in (0, 1], got {self.feature_fraction}"
            )
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(
                "RankerParams.validation_fraction must be in (0, 1), "
                f"got {self.validation_fraction}"
            )
        if self.lambda_l2 < 0 or self.early_stopping_rounds < 1 or self.max_bin < 2:
            raise ValueError(
                "RankerParams: lambda_l2 must be >= 0, early_stopping_rounds >= 1, max_bin >= 2; "
                f"got {self.lambda_l2}, {self.early_stopping_rounds}, {self.max_bin}"
            )

    def lightgbm_params(self) -> dict[str, Any]:
        return {
            "objective": "lambdarank",
            "metric": "ndcg",
            "eval_at": [self.eval_at],
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction,
            "lambda_l2": self.lambda_l2,
            "max_bin": self.max_bin,
            "num_threads": self.num_threads,
            "seed": self.seed,
            "deterministic": True,
            "force_col_wise": True,
            "verbosity": -1,
        }


@dataclass(frozen=True, eq=False)
class TrainedRanker:
    booster: lgb.Booster
    """Only the trees up to the best validation iteration."""
    metrics: dict[str, float]
    """``ndcg@K.<order>`` on held-out users for popularity, retrieval, logged and ranker orders,
    plus row and group counts and the best iteration."""
    feature_importance: dict[str, float]
    """Share of the total split gain per feature."""
    train_fingerprint: str
    """sha256 over the training and validation arrays (features, labels, group sizes)."""
    golden_features: npt.NDArray[np.float32]
    """A seeded sample of training rows; a saved model must reproduce its scores on them."""
    baseline: dict[str, Any]
    """Training distribution of every feature and of the score, for drift monitoring."""
    params: RankerParams


@dataclass(frozen=True)
class Split:
    features: npt.NDArray[np.float32]
    labels: npt.NDArray[np.int32]
    group_sizes: npt.NDArray[np.int64]
    position: npt.NDArray[np.int16]

    @property
    def rows(self) -> int:
        return int(self.labels.shape[0])

    def only_groups_with_positives(self) -> Split:
        """Drop sessions without a click: they carry no pairwise signal for lambdarank."""
        if self.rows == 0:
            return self
        starts = np.cumsum(self.group_sizes) - self.group_sizes
        has_positive = np.maximum.reduceat(self.labels, starts) > 0
        keep_rows = np.repeat(has_positive, self.group_sizes)
        return Split(
            self.features[keep_rows],
            self.labels[keep_rows],
            self.group_sizes[has_positive],
            self.position[keep_rows],
        )


def _group_sizes(session: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.int64]:
    """Run lengths of equal consecutive session ids."""
    if session.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    boundaries = np.flatnonzero(session[1:] != session[:-1]) + 1
    edges = np.concatenate(([0], boundaries, [session.shape[0]]))
    return np.diff(edges).astype(np.int64)


def _fingerprint(*arrays: npt.NDArray[Any]) -> str:
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()


def training_splits(world: World, tables: FeatureTables, params: RankerParams) -> dict[str, Split]:
    log = world.log
    if log.n_rows and bool((np.diff(log.session) < 0).any()):
        raise ValueError("world.log.session must be non-decreasing (a session's rows contiguous)")
    recent = np.flatnonzero(~world.history_mask())
    user = log.user[recent].astype(np.int32)
    features = assemble_features(
        tables,
        user,
        log.item[recent],
        log.lat[recent],
        log.lon[recent],
        log.hour[recent],
    )
    # 2 ordered (an order implies a click), 1 clicked, 0 shown
    labels = log.clicked[recent].astype(np.int32) + log.ordered[recent].astype(np.int32)
    heldout_users = world.heldout_user_mask()
    rng = np.random.default_rng(params.seed)
    in_validation = rng.random(world.users.n_users) < params.validation_fraction
    validation_users = in_validation & ~heldout_users
    role = np.where(heldout_users[user], 2, np.where(validation_users[user], 1, 0))
    session = log.session[recent]
    position = log.position[recent]
    splits = {}
    for code, name in enumerate(("train", "validation", "eval")):
        rows = role == code
        splits[name] = Split(
            features[rows], labels[rows], _group_sizes(session[rows]), position[rows]
        )
    return splits


def train_ranker(
    world: World,
    tables: FeatureTables,
    params: RankerParams = RankerParams(),
    *,
    seed: int | None = None,
    progress: Progress | None = None,
) -> TrainedRanker:
    """Train the lambdarank model and measure it on held-out users.

    ``seed``, if given, overrides ``params.seed``. ``progress(message)`` is called at each stage.
    """
    if seed is not None:
        params = replace(params, seed=seed)
    say = progress or (lambda _message: None)

    say("ranker: assembling features for the recent window")
    splits = training_splits(world, tables, params)
    return fit_ranker(splits["train"], splits["validation"], splits["eval"], params, say)


def fit_ranker(
    train: Split,
    valid: Split,
    held_out: Split,
    params: RankerParams,
    say: Progress = lambda _message: None,
    *,
    init_model: lgb.Booster | None = None,
) -> TrainedRanker:
    """Train on ``train`` (early stopping on ``valid``) and measure on ``held_out``: the part
    of :func:`train_ranker` after the splits, shared with retraining from logged traffic.

    ``init_model``: continue boosting from these trees (a warm start from the production
    model); early stopping may keep none of the new ones."""
    train = train.only_groups_with_positives()
    valid = valid.only_groups_with_positives()
    if train.rows == 0 or valid.rows == 0 or not (held_out.labels > 0).any():
        raise ValueError(
            "world has too few clicked sessions in the recent window to train and evaluate a "
            f"ranker (clicked sessions: train {train.group_sizes.shape[0]}, validation "
            f"{valid.group_sizes.shape[0]}; held-out clicks {int((held_out.labels > 0).sum())})"
        )

    say(f"ranker: training on {train.rows:,} rows in {train.group_sizes.shape[0]:,} sessions")
    lgb_params = params.lightgbm_params()
    train_set = lgb.Dataset(
        train.features,
        label=train.labels,
        group=train.group_sizes,
        feature_name=list(FEATURE_NAMES),
        categorical_feature=list(CATEGORICAL_FEATURES),
        params=lgb_params,
        free_raw_data=True,
    )
    valid_set = lgb.Dataset(
        valid.features, label=valid.labels, group=valid.group_sizes, reference=train_set
    )
    booster = lgb.train(
        lgb_params,
        train_set,
        num_boost_round=params.num_trees,
        valid_sets=[valid_set],
        valid_names=["validation"],
        callbacks=[lgb.early_stopping(params.early_stopping_rounds, verbose=False)],
        init_model=init_model,
    )
    best_iteration = booster.best_iteration or booster.current_iteration()
    final = lgb.Booster(model_str=booster.model_to_string(num_iteration=best_iteration))

    say("ranker: evaluating on held-out users")
    metrics = offline_metrics(final, held_out, params)
    metrics.update(
        {
            "train_rows": float(train.rows),
            "train_groups": float(train.group_sizes.shape[0]),
            "validation_groups": float(valid.group_sizes.shape[0]),
            "eval_rows": float(held_out.rows),
            "eval_groups": float(held_out.group_sizes.shape[0]),
            "eval_groups_with_click": float(held_out.only_groups_with_positives().group_sizes.size),
            "best_iteration": float(best_iteration),
        }
    )
    gain = final.feature_importance(importance_type="gain")
    total_gain = float(gain.sum()) or 1.0
    rng = np.random.default_rng(params.seed)
    sample = np.sort(rng.choice(train.rows, size=min(BASELINE_ROWS, train.rows), replace=False))
    sample_features = train.features[sample]
    sample_scores = final.predict(sample_features, num_threads=params.num_threads)
    golden = np.sort(rng.choice(train.rows, size=min(GOLDEN_ROWS, train.rows), replace=False))
    return TrainedRanker(
        booster=final,
        metrics=metrics,
        feature_importance={
            name: float(g) / total_gain for name, g in zip(FEATURE_NAMES, gain, strict=True)
        },
        train_fingerprint=_fingerprint(
            train.features,
            train.labels,
            train.group_sizes,
            valid.features,
            valid.labels,
            valid.group_sizes,
        ),
        golden_features=np.ascontiguousarray(train.features[golden]),
        baseline=distribution_baseline(
            sample_features,
            np.asarray(sample_scores),
            names=FEATURE_NAMES,
            categorical=CATEGORICAL_FEATURES,
        ),
        params=params,
    )


def offline_metrics(
    booster: lgb.Booster, held_out: Split, params: RankerParams
) -> dict[str, float]:
    k = params.eval_at
    x = held_out.features
    orders = {
        "popularity": x[:, FEATURE_INDEX["item_popularity"]],
        "retrieval": x[:, FEATURE_INDEX["mf_score"]],
        "logged": -held_out.position.astype(np.float64),
        "ranker": booster.predict(x, num_threads=params.num_threads),
    }
    return {
        f"ndcg@{k}.{name}": ndcg_at_k(
            held_out.labels, scores, group_sizes=held_out.group_sizes, k=k
        )
        for name, scores in orders.items()
    }
