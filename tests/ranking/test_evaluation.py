from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.ranking.evaluation import (
    bin_counts,
    categorical_distribution,
    distribution_baseline,
    ndcg_at_k,
    ndcg_per_group,
    numeric_distribution,
)


def reference_ndcg(
    sizes: list[int], labels: list[int], scores: list[float], k: int
) -> float | None:
    """NDCG@k one group at a time, the textbook way (ties: worse label first)."""
    values = []
    start = 0
    for size in sizes:
        y = labels[start : start + size]
        s = scores[start : start + size]
        start += size
        ranked = sorted(range(size), key=lambda i: (-s[i], y[i]))
        dcg = sum((2 ** y[i] - 1) / math.log2(r + 2) for r, i in enumerate(ranked[:k]))
        ideal = sorted(y, reverse=True)
        idcg = sum((2**g - 1) / math.log2(r + 2) for r, g in enumerate(ideal[:k]))
        if idcg > 0:
            values.append(dcg / idcg)
    return sum(values) / len(values) if values else None


@st.composite
def grouped(draw: st.DrawFn) -> tuple[list[int], list[int], list[float]]:
    sizes = draw(st.lists(st.integers(1, 12), min_size=1, max_size=8))
    m = sum(sizes)
    labels = draw(st.lists(st.integers(0, 2), min_size=m, max_size=m))
    scores = draw(
        st.lists(st.sampled_from([-1.0, 0.0, 0.25, 0.5, 2.0, 3.5]), min_size=m, max_size=m)
    )
    return sizes, labels, scores


def test_hand_computed_example() -> None:
    # group A: order by score is (label 0, label 1, label 2):
    #   DCG = 0 + 1/log2(3) + 3/log2(4); IDCG = 3 + 1/log2(3)
    # group B has no positive label and is left out of the mean.
    # group C: scores tie between a label-1 and a label-0 row, the label-0 row goes first:
    #   order (0, 0, 1), DCG = 1/log2(4) = 0.5, IDCG = 1
    labels = [2, 0, 1, 0, 0, 1, 0, 0]
    scores = [0.1, 0.9, 0.5, 0.3, 0.4, 0.2, 0.2, 0.3]
    sizes = [3, 2, 3]
    ndcg_a = (1 / math.log2(3) + 1.5) / (3 + 1 / math.log2(3))
    assert ndcg_a == pytest.approx(0.586883, abs=1e-6)
    expected = (ndcg_a + 0.5) / 2
    assert ndcg_at_k(labels, scores, group_sizes=sizes, k=20) == pytest.approx(expected)
    per_group = ndcg_per_group(labels, scores, group_sizes=sizes)
    assert per_group[0] == pytest.approx(ndcg_a)
    assert math.isnan(per_group[1])
    assert per_group[2] == pytest.approx(0.5)
    # k=1: both groups put a label-0 row first.
    assert ndcg_at_k(labels, scores, group_sizes=sizes, k=1) == 0.0
    # k=2 in group A: 1/log2(3) over 3 + 1/log2(3)
    assert ndcg_per_group(labels, scores, group_sizes=sizes, k=2)[0] == pytest.approx(
        (1 / math.log2(3)) / (3 + 1 / math.log2(3))
    )


def test_group_ids_in_any_order_match_group_sizes() -> None:
    rng = np.random.default_rng(0)
    sizes = np.array([5, 1, 7, 3])
    labels = rng.integers(0, 3, sizes.sum())
    scores = rng.normal(size=sizes.sum())
    ids = np.repeat(np.array([40, 10, 30, 20]), sizes)
    shuffle = rng.permutation(sizes.sum())
    by_sizes = ndcg_at_k(labels, scores, group_sizes=sizes)
    by_ids = ndcg_at_k(labels[shuffle], scores[shuffle], group_ids=ids[shuffle])
    assert by_ids == pytest.approx(by_sizes)


def test_constant_scorer_gets_no_credit_from_ties() -> None:
    labels = np.array([1, 0, 0, 0])
    worst = ndcg_at_k(labels, [0.0, 0.0, 0.0, 0.0], group_sizes=[4])
    assert worst == pytest.approx(1 / math.log2(5))


@settings(max_examples=200, deadline=None)
@given(grouped(), st.integers(1, 15))
def test_matches_reference(data: tuple[list[int], list[int], list[float]], k: int) -> None:
    sizes, labels, scores = data
    expected = reference_ndcg(sizes, labels, scores, k)
    if expected is None:
        with pytest.raises(ValueError, match="no group has a positive label"):
            ndcg_at_k(labels, scores, group_sizes=sizes, k=k)
    else:
        assert ndcg_at_k(labels, scores, group_sizes=sizes, k=k) == pytest.approx(expected)


@settings(max_examples=200, deadline=None)
@given(grouped(), st.integers(1, 15))
def test_perfect_order_is_one_and_any_order_is_in_unit_interval(
    data: tuple[list[int], list[int], list[float]], k: int
) -> None:
    sizes, labels, scores = data
    if not any(labels):
        return
    assert ndcg_at_k(labels, [float(y) for y in labels], group_sizes=sizes, k=k) == pytest.approx(
        1.0
    )
    value = ndcg_at_k(labels, scores, group_sizes=sizes, k=k)
    assert 0.0 <= value <= 1.0 + 1e-12
    # Only the order matters: a strictly increasing transform of the scores changes nothing.
    transformed = [3.0 * s + 7.0 for s in scores]
    assert ndcg_at_k(labels, transformed, group_sizes=sizes, k=k) == pytest.approx(value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of group_sizes or group_ids"),
        ({"group_sizes": [2, 1], "group_ids": [0, 0, 1]}, "exactly one"),
        ({"group_sizes": [2, 2]}, "group_sizes sum to 4, expected 3"),
        ({"group_sizes": [4, -1]}, "group_sizes must be >= 0"),
        ({"group_ids": [0, 1]}, r"group_ids has shape \(2,\), expected \(3,\)"),
        ({"group_sizes": [3], "k": 0}, "k must be >= 1"),
    ],
)
def test_rejects_bad_groups(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ndcg_at_k([1, 0, 0], [0.1, 0.2, 0.3], **kwargs)  # type: ignore[arg-type]


def test_rejects_bad_labels_and_scores() -> None:
    with pytest.raises(ValueError, match="scores contain NaN \\(first at row 1\\)"):
        ndcg_at_k([1, 0], [0.0, np.nan], group_sizes=[2])
    with pytest.raises(ValueError, match="labels must be finite and >= 0"):
        ndcg_at_k([1, -1], [0.0, 1.0], group_sizes=[2])
    with pytest.raises(ValueError, match="scores has shape"):
        ndcg_at_k([1, 0], [0.0], group_sizes=[2])


def test_numeric_distribution_deciles() -> None:
    values = np.concatenate([np.arange(1000, dtype=np.float64), [np.nan, np.nan]])
    dist = numeric_distribution(values)
    assert dist["missing"] == 2
    assert len(dist["edges"]) == 9
    assert dist["counts"] == [100] * 10
    assert dist["min"] == 0.0
    assert dist["max"] == 999.0
    # Live values binned with the same edges land in the same bins.
    assert bin_counts(dist["edges"], np.arange(1000.0)).tolist() == dist["counts"]


def test_numeric_distribution_with_repeated_values_has_unique_edges() -> None:
    values = np.array([0.0] * 900 + list(range(1, 101)), dtype=np.float64)
    dist = numeric_distribution(values)
    assert dist["edges"] == sorted(set(dist["edges"]))
    assert sum(dist["counts"]) == 1000
    assert dist["counts"][0] >= 900  # every zero in the first bin (-inf, 0]


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=300))
def test_bin_counts_count_every_value_once(values: list[float]) -> None:
    dist = numeric_distribution(values)
    assert sum(dist["counts"]) == len(values)
    assert len(dist["counts"]) == len(dist["edges"]) + 1


def test_categorical_distribution_and_baseline() -> None:
    codes = np.array([0, 3, 3, 5, 5, 5], dtype=np.float32)
    assert categorical_distribution(codes) == {
        "kind": "categorical",
        "values": [0, 3, 5],
        "counts": [1, 2, 3],
        "missing": 0,
    }
    features: npt.NDArray[np.float32] = np.stack([np.arange(6, dtype=np.float32), codes], axis=1)
    baseline = distribution_baseline(
        features, np.linspace(0, 1, 6), names=("x", "c"), categorical=("c",)
    )
    assert baseline["rows"] == 6
    assert baseline["features"]["x"]["kind"] == "numeric"
    assert baseline["features"]["c"]["counts"] == [1, 2, 3]
    assert sum(baseline["score"]["counts"]) == 6
    with pytest.raises(ValueError, match=r"expected \(rows, 3\)"):
        distribution_baseline(features, np.zeros(6), names=("a", "b", "c"), categorical=())
