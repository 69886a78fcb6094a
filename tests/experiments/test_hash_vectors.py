"""The checked-in test vectors: in sync with the code, and reproducible from the written spec."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest

from recsys.experiments import hashing
from recsys.experiments.vectors import build_vectors

VECTORS = Path(__file__).resolve().parents[2] / "recsys" / "experiments" / "hash_vectors.json"


@pytest.fixture(scope="module")
def vectors() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(VECTORS.read_text(encoding="utf-8"))
    return loaded


# -- an independent transcription of docs/experiments.md "The hash", sharing no code ----------

M = 2**64


def spec_key64(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def spec_mix64(z: int) -> int:
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 % M
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB % M
    return z ^ (z >> 31)


def spec_bucket(user_id: str, layer_salt: str, num_buckets: int) -> int:
    return spec_mix64(spec_key64(user_id) ^ spec_key64("layer:" + layer_salt)) % num_buckets


def spec_arm(user_id: str, salt: str, epoch: int, weights: list[float]) -> tuple[int, int]:
    point = spec_mix64(spec_key64(user_id) ^ spec_key64(f"experiment:{salt}/{epoch}")) >> 32
    total = 0.0
    for w in weights:  # float64, left to right
        total += float(w)
    running = 0.0
    for j, w in enumerate(weights[:-1]):
        running += float(w)
        if point < math.floor(running / total * 2**32):
            return point, j
    return point, len(weights) - 1


# ----------------------------------------------------------------------------------------------


def test_file_is_in_sync_with_the_code(vectors: dict[str, Any]) -> None:
    assert vectors == build_vectors(), "regenerate: python -m recsys.experiments.vectors > " + str(
        VECTORS
    )


def test_mix64_is_the_published_splitmix64_finaliser() -> None:
    # splitmix64 seeded with 0: its first two outputs (the reference generator by S. Vigna)
    gamma = 0x9E3779B97F4A7C15
    assert spec_mix64(gamma) == hashing.mix64(gamma) == 0xE220A8397B1DCDAF
    assert spec_mix64(2 * gamma % M) == hashing.mix64(2 * gamma % M) == 0x6E789E6AA1B965F4


def test_spec_reproduces_key64_and_mix64(vectors: dict[str, Any]) -> None:
    for case in vectors["key64"]:
        assert str(spec_key64(case["text"])) == case["key64"]
    for case in vectors["mix64"]:
        assert str(spec_mix64(int(case["input"]))) == case["output"]


def test_spec_reproduces_buckets(vectors: dict[str, Any]) -> None:
    assert len(vectors["buckets"]) >= 100
    for case in vectors["buckets"]:
        got = spec_bucket(case["user_id"], case["layer_salt"], case["num_buckets"])
        assert got == case["bucket"], case
    for case in vectors["holdout"]:
        key = spec_mix64(
            spec_key64(case["user_id"]) ^ spec_key64("holdout:" + case["holdout_salt"])
        )
        assert key % case["num_buckets"] == case["bucket"]


def test_spec_reproduces_arms(vectors: dict[str, Any]) -> None:
    for case in vectors["arms"]:
        point, arm = spec_arm(
            case["user_id"], case["experiment_salt"], case["epoch"], case["weights"]
        )
        assert (point, arm) == (case["point"], case["arm"]), case
    for case in vectors["thresholds"]:
        assert hashing.arm_thresholds(case["weights"]) == case["thresholds"]
        assert case["thresholds"][-1] == 2**32


def test_vectors_cover_every_arm_and_non_ascii_ids(vectors: dict[str, Any]) -> None:
    arms = {(tuple(c["weights"]), c["arm"]) for c in vectors["arms"]}
    assert len(arms) >= 8
    assert any(not c["user_id"].isascii() for c in vectors["buckets"])
