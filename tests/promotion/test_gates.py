"""Offline gate metrics and checks on small hand-made held-out sets."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.promotion.gates import discounted_rate_per_group, offline_checks, replay_checks
from recsys.promotion.holdout import EvalSet
from recsys.promotion.policy import OfflineCheck, ReplayPolicy


def _brute_force(hits: list[float], scores: list[float], sizes: list[int], k: int) -> list[float]:
    out, start = [], 0
    for size in sizes:
        rows = sorted(range(start, start + size), key=lambda i: (-scores[i], hits[i]))[:k]
        weights = [1 / math.log2(r + 2) for r in range(len(rows))]
        total = sum(weights)
        out.append(
            sum(w * hits[i] for w, i in zip(weights, rows, strict=True)) / total
            if total
            else math.nan
        )
        start += size
    return out


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(
        st.lists(st.tuples(st.booleans(), st.integers(0, 5)), min_size=1, max_size=30),
        min_size=1,
        max_size=8,
    ),
    k=st.integers(1, 25),
)
def test_the_discounted_rate_matches_a_per_group_loop(
    data: list[list[tuple[bool, int]]], k: int
) -> None:
    hits = [float(h) for group in data for h, _ in group]
    scores = [float(s) for group in data for _, s in group]
    sizes = [len(group) for group in data]
    got = discounted_rate_per_group(np.array(hits), np.array(scores), np.array(sizes), k)
    np.testing.assert_allclose(got, _brute_force(hits, scores, sizes, k))


def _eval_set() -> EvalSet:
    rng = np.random.default_rng(0)
    groups, size = 200, 10
    labels = (rng.random(groups * size) < 0.15).astype(np.int32)
    return EvalSet(
        features=np.zeros((groups * size, 1), dtype=np.float32),
        labels=labels,
        group_sizes=np.full(groups, size, dtype=np.int64),
        district=np.where(np.arange(groups) < 150, "d1", "d2"),
        surface=np.full(groups, "home"),
        new_user=np.arange(groups) % 10 == 0,
        description="test",
    )


def test_a_model_that_ranks_clicks_first_passes_and_a_random_one_fails() -> None:
    data = _eval_set()
    n = int(data.labels.shape[0])
    good = np.asarray(data.labels + np.random.default_rng(1).random(n) * 0.1, dtype=np.float64)
    random = np.asarray(np.random.default_rng(2).random(n), dtype=np.float64)
    checks = [
        OfflineCheck("ndcg@20", "overall", max_drop_abs=0.01, max_drop_rel=0.02),
        OfflineCheck("ctr@20", "district:*", max_drop_rel=0.05),
    ]
    same = offline_checks(data, good, good, checks, min_groups=50)
    assert [c.name for c in same] == ["ndcg@20 overall", "ctr@20 district:d1", "ctr@20 district:d2"]
    assert all(c.passed and c.gated for c in same)

    worse = offline_checks(data, good, random, checks, min_groups=50)
    overall = worse[0]
    assert not overall.passed
    assert overall.champion is not None
    assert overall.champion > overall.challenger
    assert "drop" in overall.note
    # d2 has 50 groups but fewer with a click: reported, not gated, when below min_groups
    small = offline_checks(data, good, random, checks, min_groups=100)
    assert [c.gated for c in small] == [True, True, False]


def test_the_replay_gate_reads_the_diff_and_does_not_run_without_traffic() -> None:
    policy = ReplayPolicy(min_requests=20, max_changed_share=0.5, max_abs_score_shift=1.0)
    skipped = replay_checks(None, policy)
    assert [(c.gated, c.passed) for c in skipped] == [(False, True)]
    diff = {"overall": {"all": {"requests": 40.0, "changed_share": 0.8, "mean_score_shift": -0.2}}}
    checks = replay_checks(diff, policy)
    assert [(c.name, c.passed) for c in checks] == [
        ("changed top-k share", False),
        ("mean score shift", True),
        ("requests replayed", True),
    ]
