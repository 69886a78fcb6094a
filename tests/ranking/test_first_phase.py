"""Two-phase ranking: which rows the full model scores, and how the two phases combine."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from recsys.ranking.first_phase import combine, positions_in_segments, survivors


def test_positions_restart_in_every_request() -> None:
    assert positions_in_segments([3, 0, 2]).tolist() == [0, 1, 2, 0, 1]


def test_survivors_are_each_requests_first_rows_and_zero_keeps_all() -> None:
    kept = survivors([4, 3, 2], [2, 0, 5])
    assert kept.tolist() == [True, True, False, False, True, True, True, True, True]


def test_no_cut_keeps_every_row_and_still_checks_the_counts() -> None:
    assert survivors([3, 0, 2], [0, 0, 0]).tolist() == [True] * 5
    assert survivors(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)).tolist() == []
    with pytest.raises(ValueError, match="counts must be a 1-D array"):
        survivors([2, -1], [0, 0])
    with pytest.raises(ValueError, match="counts must be a 1-D array"):
        survivors([[2, 1]], [[0, 0]])


def test_bad_cuts_are_named() -> None:
    with pytest.raises(ValueError, match="cuts must be >= 0"):
        survivors([2], [-1])
    with pytest.raises(ValueError, match="cuts has shape"):
        survivors([2, 3], [1])


requests = st.lists(st.tuples(st.integers(0, 30), st.integers(0, 40)), min_size=1, max_size=8)


@given(requests, st.integers(0, 2**31 - 1))
def test_every_survivor_outranks_every_other_row_and_the_rest_keep_arrival_order(
    shape: list[tuple[int, int]], seed: int
) -> None:
    counts = np.array([n for n, _ in shape], dtype=np.int64)
    cuts = np.array([c for _, c in shape], dtype=np.int64)
    rng = np.random.default_rng(seed)
    model = rng.normal(size=int(counts.sum())).astype(np.float32)
    kept = survivors(counts, cuts)
    out = combine(counts, model, kept)
    assert np.array_equal(out[kept], model[kept])
    start = 0
    for n in counts.tolist():  # checking each request of the example
        rows = slice(start, start + n)
        top, rest = out[rows][kept[rows]], out[rows][~kept[rows]]
        if top.size and rest.size:
            assert top.min() > rest.max()
        assert (np.diff(rest) < 0).all()
        start += n
