"""Properties of the assignment hash: determinism, uniformity, independence between layers."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from recsys.experiments import hashing

N_USERS = 100_000
UNIFORMITY_P = 1e-6
"""A true hash fails a test at this level once in a million runs; a biased one fails always."""

u64 = st.integers(min_value=0, max_value=2**64 - 1)
salts = st.text(min_size=1, max_size=24)
user_ids = st.text(min_size=1, max_size=40)


@functools.cache
def user_keys() -> hashing.U64Array:
    """Keys of 100k distinct user ids, computed once per test session."""
    return np.array([hashing.user_key(f"user-{i}") for i in range(N_USERS)], dtype=np.uint64)


def buckets_of(salt: str, num_buckets: int) -> hashing.U64Array:
    z = hashing.mix64_array(user_keys() ^ np.uint64(hashing.layer_key(salt)))
    return z % np.uint64(num_buckets)


@given(st.lists(u64, min_size=1, max_size=50))
def test_vectorised_mix_equals_the_scalar_reference(values: list[int]) -> None:
    array = hashing.mix64_array(np.array(values, dtype=np.uint64))
    assert array.tolist() == [hashing.mix64(v) for v in values]


@given(user_ids, salts, st.integers(min_value=1000, max_value=1_000_000))
def test_bucket_is_deterministic_and_in_range(user_id: str, salt: str, num_buckets: int) -> None:
    key = hashing.layer_key(salt)
    first = hashing.bucket(user_id, key, num_buckets)
    assert first == hashing.bucket(user_id, hashing.layer_key(salt), num_buckets)
    assert 0 <= first < num_buckets


def test_buckets_are_the_same_in_another_process_with_another_hash_seed() -> None:
    ids = [f"user-{i}" for i in range(50)] + ["ユーザー", "🍕"]
    here = [hashing.bucket(u, hashing.layer_key("retrieval"), 10_000) for u in ids]
    code = (
        "import json, sys; from recsys.experiments import hashing; "
        "ids = json.load(sys.stdin); "
        "print(json.dumps([hashing.bucket(u, hashing.layer_key('retrieval'), 10000) for u in ids]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(ids),
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert json.loads(out.stdout) == here


@settings(max_examples=8, derandomize=True, deadline=None)
@given(salts)
def test_buckets_are_uniform_over_100k_users(salt: str) -> None:
    counts = np.bincount(buckets_of(salt, 10_000).astype(np.int64), minlength=10_000)
    assert stats.chisquare(counts).pvalue > UNIFORMITY_P
    coarse = np.bincount(buckets_of(salt, 1000).astype(np.int64) // 100, minlength=10)
    assert stats.chisquare(coarse).pvalue > UNIFORMITY_P


@settings(max_examples=8, derandomize=True, deadline=None)
@given(salts, salts)
def test_layers_are_independent(salt_a: str, salt_b: str) -> None:
    """Where a user lands in one layer says nothing about where they land in another."""
    if salt_a == salt_b:
        salt_b += "-other"
    a = buckets_of(salt_a, 10_000).astype(np.int64) // 1000  # deciles of the layer
    b = buckets_of(salt_b, 10_000).astype(np.int64) // 1000
    table = np.zeros((10, 10), dtype=np.int64)
    np.add.at(table, (a, b), 1)
    assert stats.chi2_contingency(table).pvalue > UNIFORMITY_P


@settings(max_examples=6, derandomize=True, deadline=None)
@given(salts, st.integers(min_value=0, max_value=50))
def test_arm_hash_is_independent_of_the_bucket_and_of_the_previous_epoch(
    salt: str, epoch: int
) -> None:
    buckets = buckets_of("layer", 10_000).astype(np.int64) // 1000
    points = []
    for e in (epoch, epoch + 1):
        z = hashing.mix64_array(user_keys() ^ np.uint64(hashing.experiment_key(salt, e)))
        points.append((z >> np.uint64(32)).astype(np.int64))
    halves = [p // 2**31 for p in points]  # a 50/50 split
    for x, y, nx in ((buckets, halves[0], 10), (halves[0], halves[1], 2)):
        table = np.zeros((nx, 2), dtype=np.int64)
        np.add.at(table, (x, y), 1)
        assert stats.chi2_contingency(table).pvalue > UNIFORMITY_P


@settings(max_examples=10, derandomize=True, deadline=None)
@given(st.lists(st.floats(min_value=0.01, max_value=100), min_size=2, max_size=5))
def test_arms_receive_traffic_in_proportion_to_weight(weights: list[float]) -> None:
    thresholds = np.array(hashing.arm_thresholds(weights), dtype=np.uint64)
    z = hashing.mix64_array(user_keys() ^ np.uint64(hashing.experiment_key("exp", 0)))
    arms = np.searchsorted(thresholds, z >> np.uint64(32), side="right")
    counts = np.bincount(arms, minlength=len(weights))
    expected = np.array(weights) / sum(weights) * N_USERS
    assert stats.chisquare(counts, expected).pvalue > UNIFORMITY_P


@given(st.lists(st.floats(min_value=1e-3, max_value=1e3), min_size=1, max_size=8), u64)
def test_arm_thresholds_are_increasing_and_end_at_2_to_32(weights: list[float], z: int) -> None:
    thresholds = hashing.arm_thresholds(weights)
    assert thresholds == sorted(thresholds)
    assert thresholds[-1] == 2**32
    point = z >> 32
    j = hashing.arm_index(point, thresholds)
    assert thresholds[j] > point
    assert j == 0 or thresholds[j - 1] <= point
