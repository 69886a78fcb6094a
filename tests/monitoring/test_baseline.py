"""Binning live values into a training baseline: equal to a reference histogram, and the
training data itself folds back onto the baseline's own counts."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.monitoring.baseline import SCORE, BaselineBins, BaselineError
from recsys.ranking.evaluation import distribution_baseline

NAMES = ("price", "cuisine", "distance")


def make_baseline(
    rng: np.random.Generator, rows: int = 5000
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    features = np.column_stack(
        [
            rng.lognormal(2.0, 0.5, rows),
            rng.integers(0, 6, rows).astype(np.float64),
            rng.exponential(3.0, rows),
        ]
    ).astype(np.float32)
    scores = rng.normal(0.0, 1.0, rows).astype(np.float32)
    baseline = distribution_baseline(features, scores, names=NAMES, categorical=("cuisine",))
    return baseline, features, scores


def reference_slots(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """np.histogram over the slots ``(-inf, x0], (x0, x1], ..., (x_last, inf)`` plus a NaN count.

    np.histogram's bins are closed on the left, ours on the right: histogram the negated values
    over the negated, reversed edges and reverse the counts back."""
    present = values[~np.isnan(values)]
    bounds = np.concatenate([[-np.inf], edges, [np.inf]])
    counts, _ = np.histogram(-present, bins=-bounds[::-1])
    return np.concatenate([counts[::-1], [np.isnan(values).sum()]])


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    shift=st.floats(-3.0, 3.0),
    nan_share=st.floats(0.0, 0.5),
)
def test_numeric_binning_equals_a_reference_histogram(
    seed: int, shift: float, nan_share: float
) -> None:
    rng = np.random.default_rng(seed)
    baseline, features, _ = make_baseline(rng, rows=500)
    bins = BaselineBins.compile("v1", baseline, NAMES)
    live = features[rng.integers(0, 500, 300)].astype(np.float64)
    live[:, 0] += shift * 5
    live[:, 2] *= 1 + shift
    live[:, 0][rng.random(300) < nan_share] = np.nan
    live_scores = rng.normal(shift, 1.0, 300).astype(np.float32)
    live[:5, 0] = baseline["features"]["price"]["edges"][:5]  # values on (float32) edges
    live = live.astype(np.float32)  # what the rank stage makes
    counts = bins.count(live, live_scores, np.zeros(300, dtype=np.int64), 1)[0]
    split = bins.column_counts(counts)
    for name, values in (("price", live[:, 0]), ("distance", live[:, 2]), (SCORE, live_scores)):
        column = next(c for c in bins.columns if c.name == name)
        reference = reference_slots(column.edges, values.astype(np.float64))
        np.testing.assert_array_equal(split[name], reference)


@settings(max_examples=60, deadline=None)
@given(
    edges=st.lists(
        st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=12, unique=True
    ),
    values=st.lists(
        st.floats(-2e6, 2e6, width=32) | st.just(float("nan")), min_size=1, max_size=50
    ),
    nudge=st.floats(-1e-3, 1e-3),
)
def test_any_float32_value_bins_as_a_float64_histogram_would(
    edges: list[float], values: list[float], nudge: float
) -> None:
    """Edges need not be float32 (quantiles interpolate); values on, just under and just over
    an edge, negative values and -0.0 all land where the float64 comparison puts them."""
    inner = np.sort(np.asarray(edges, dtype=np.float64) + nudge)
    lo, hi = float(inner[0]) - 1.0, float(inner[-1]) + 1.0
    spec = {"kind": "numeric", "edges": inner.tolist(), "counts": [1] * (inner.size + 1),
            "min": lo, "max": hi}  # fmt: skip
    bins = BaselineBins.compile("v", {"features": {"x": spec}, "score": spec}, ("x",))
    on_edges = np.concatenate([inner, np.nextafter(inner, np.inf), np.nextafter(inner, -np.inf)])
    live = np.concatenate([values, on_edges, [-0.0, 0.0, lo, hi]]).astype(np.float32)
    counts = bins.count(live[:, None], live, np.zeros(live.size, np.int64), 1)[0]
    x = bins.column_counts(counts)["x"]
    np.testing.assert_array_equal(
        x, reference_slots(bins.columns[0].edges, live.astype(np.float64))
    )


def test_categorical_codes_map_to_their_slots_unseen_and_nan_apart() -> None:
    baseline, _, _ = make_baseline(np.random.default_rng(1))
    bins = BaselineBins.compile("v1", baseline, NAMES)
    live = np.zeros((6, 3))
    live[:, 1] = [0, 5, 5, 9, -1, np.nan]  # 9 and -1 were never seen in training
    counts = bins.column_counts(bins.count(live, np.zeros(6), np.zeros(6, np.int64), 1)[0])
    cuisine = counts["cuisine"]  # codes 0..5, unseen, nan
    assert cuisine.tolist() == [1, 0, 0, 0, 0, 2, 2, 1]


def test_the_training_sample_folds_back_onto_the_baselines_own_counts() -> None:
    baseline, features, scores = make_baseline(np.random.default_rng(2))
    bins = BaselineBins.compile("v1", baseline, NAMES)
    counts = bins.count(features, scores, np.zeros(len(scores), np.int64), 1)[0]
    for column in bins.columns:
        slots = counts[column.offset : column.offset + column.size]
        np.testing.assert_array_equal(column.fold(slots), column.expected)
        assert column.out_of_range(slots) == 0


def test_rows_are_counted_in_their_own_group() -> None:
    baseline, features, scores = make_baseline(np.random.default_rng(3))
    bins = BaselineBins.compile("v1", baseline, NAMES)
    groups = np.arange(len(scores)) % 3
    by_group = bins.count(features, scores, groups, 3)
    for g in range(3):
        alone = bins.count(
            features[groups == g], scores[groups == g], np.zeros((groups == g).sum(), np.int64), 1
        )[0]
        np.testing.assert_array_equal(by_group[g], alone)


def test_a_baseline_whose_counts_do_not_fit_its_edges_is_refused_naming_the_column() -> None:
    baseline, _, _ = make_baseline(np.random.default_rng(4))
    baseline["features"]["price"]["counts"] = [1, 2]
    with pytest.raises(BaselineError, match="baseline price"):
        BaselineBins.compile("v1", baseline, NAMES)


def test_a_feature_training_never_saw_a_value_of_is_not_monitored() -> None:
    baseline, _, _ = make_baseline(np.random.default_rng(5))
    baseline["features"]["distance"] = {"kind": "numeric", "edges": [], "counts": [0], "missing": 9}
    bins = BaselineBins.compile("v1", baseline, NAMES)
    assert bins.names == ("price", "cuisine", SCORE)
    assert not math.isnan(bins.columns[0].edges[0])
