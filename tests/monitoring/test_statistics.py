"""PSI, Jensen-Shannon and Wilson intervals against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recsys.monitoring.statistics import SHARE_FLOOR, js_distance, psi, wilson_interval


def test_psi_of_identical_distributions_is_zero() -> None:
    counts = np.array([10, 20, 30, 40])
    assert psi(counts, counts) == 0.0
    assert psi(counts * 7, counts) == pytest.approx(0.0, abs=1e-15)  # shares, not counts


def test_psi_of_a_known_shift_matches_the_hand_computed_value() -> None:
    # baseline 25/25/25/25 %, live 10/20/30/40 %:
    # (0.10-0.25) ln(0.10/0.25) + (0.20-0.25) ln(0.20/0.25)
    #   + (0.30-0.25) ln(0.30/0.25) + (0.40-0.25) ln(0.40/0.25)
    # = 0.137444 + 0.011157 + 0.009116 + 0.070500 = 0.228217
    assert psi([10, 20, 30, 40], [25, 25, 25, 25]) == pytest.approx(0.228217, abs=1e-6)


def test_an_empty_bin_is_floored_not_infinite() -> None:
    # live 0/100 %, baseline 50/50 %: the empty bin counts as SHARE_FLOOR.
    expected = (SHARE_FLOOR - 0.5) * math.log(SHARE_FLOOR / 0.5) + 0.5 * math.log(1 / 0.5)
    assert psi([0, 10], [5, 5]) == pytest.approx(expected)


def test_psi_of_an_empty_side_is_nan_and_mismatched_bins_are_refused() -> None:
    assert math.isnan(psi([0, 0], [1, 1]))
    with pytest.raises(ValueError, match="same bins"):
        psi([1, 2, 3], [1, 2])


def test_jensen_shannon_is_zero_for_equal_and_one_for_disjoint_distributions() -> None:
    assert js_distance([1, 2, 3], [2, 4, 6]) == pytest.approx(0.0, abs=1e-7)
    assert js_distance([1, 0], [0, 1]) == pytest.approx(1.0)


def test_wilson_interval_matches_the_textbook_example() -> None:
    # 10 successes in 100 trials, 95 %: (0.0552, 0.1744) (Newcombe 1998, method 3).
    low, high = wilson_interval(10, 100)
    assert low == pytest.approx(0.0552, abs=1e-4)
    assert high == pytest.approx(0.1744, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
