"""Sliding drift windows: counts slide out, the live reference is the first full window with
enough requests, keys are capped, and a shifted window reads as drift."""

from __future__ import annotations

import math

import numpy as np

from recsys.monitoring.baseline import SCORE, BaselineBins
from recsys.monitoring.windows import ALL_ARMS, DriftWindows
from tests.monitoring.test_baseline import NAMES, make_baseline


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def setup(
    min_requests: int = 10,
) -> tuple[BaselineBins, np.ndarray, np.ndarray, DriftWindows, Clock]:
    baseline, features, scores = make_baseline(np.random.default_rng(7))
    bins = BaselineBins.compile("v1", baseline, NAMES)
    clock = Clock()
    windows = DriftWindows(60.0, slots=6, min_requests=min_requests, clock=clock)
    return bins, features, scores, windows, clock


def counts_of(bins: BaselineBins, features: np.ndarray, scores: np.ndarray) -> np.ndarray:
    counts: np.ndarray = bins.count(features, scores, np.zeros(len(scores), np.int64), 1)[0]
    return counts


def test_counts_leave_the_window_once_it_has_slid_past_them() -> None:
    bins, features, scores, windows, clock = setup()
    windows.add([("v1", "a", 5, counts_of(bins, features[:100], scores[:100]))], {"v1": bins})
    clock.now += 30
    windows.add([("v1", "a", 5, counts_of(bins, features[:50], scores[:50]))], {"v1": bins})
    (arm, every) = windows.stats()
    assert (arm.arm, arm.rows, arm.requests) == ("a", 150, 10)
    assert (every.arm, every.rows) == (ALL_ARMS, 150)
    clock.now += 45  # the first add is now more than 60 s old
    assert [s.rows for s in windows.stats()] == [50, 50]
    clock.now += 60
    assert windows.stats() == []


def test_the_live_reference_is_the_first_full_window_and_drift_is_measured_against_it() -> None:
    bins, features, scores, windows, clock = setup(min_requests=10)
    baselines = {"v1": bins}
    for _ in range(7):  # a full window of the training distribution, 10 s per slot
        windows.add([("v1", "a", 3, counts_of(bins, features[:2000], scores[:2000]))], baselines)
        clock.now += 10
    before = windows.stats()[0]
    assert not math.isnan(before.reference_start)
    assert before.score.drift_psi < 0.05  # the same distribution as the reference
    shifted = scores[2000:4000] + 1.5  # the score moves; the features do not
    for _ in range(7):
        windows.add([("v1", "a", 3, counts_of(bins, features[2000:4000], shifted))], baselines)
        clock.now += 10
    stats = windows.stats()[0]
    assert not math.isnan(stats.reference_start)
    assert stats.score.drift_psi > 0.2
    assert stats.column("price").drift_psi < 0.05
    assert stats.drifted(0.2, min_requests=10) == (SCORE,)
    assert stats.drifted(0.2, min_requests=10_000) == ()  # not enough requests to judge


def test_a_window_with_too_few_requests_never_becomes_the_reference() -> None:
    bins, features, scores, windows, clock = setup(min_requests=1_000)
    for _ in range(20):
        windows.add([("v1", "a", 3, counts_of(bins, features, scores))], {"v1": bins})
        clock.now += 10
    assert all(math.isnan(s.reference_start) for s in windows.stats())
    assert all(math.isnan(c.drift_psi) for c in windows.stats()[0].columns)


def test_keys_beyond_the_cap_are_dropped_and_counted() -> None:
    bins, features, scores, _, clock = setup()
    windows = DriftWindows(60.0, max_keys=2, clock=clock)
    c = counts_of(bins, features[:10], scores[:10])
    windows.add([("v1", "a", 1, c), ("v1", "b", 1, c)], {"v1": bins})
    assert {s.arm for s in windows.stats()} == {"a", ALL_ARMS}
    assert windows.dropped == 1


def test_counts_of_a_version_without_a_baseline_are_ignored() -> None:
    bins, features, scores, windows, _ = setup()
    windows.add([("v2", "a", 1, counts_of(bins, features[:10], scores[:10]))], {"v1": bins})
    assert windows.stats() == []
