"""Sample-ratio mismatch over exposure counts and exposure logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsys.experiments.srm import count_exposures, srm_test


def test_counts_matching_the_weights_pass() -> None:
    result = srm_test({"a": 5050, "b": 4950}, {"a": 1, "b": 1})
    assert not result.mismatch
    assert result.expected == (5000.0, 5000.0)


def test_a_skewed_split_is_a_mismatch() -> None:
    result = srm_test({"a": 5300, "b": 4700}, {"a": 1, "b": 1})
    assert result.mismatch
    assert result.p_value < 1e-6


def test_unequal_weights_are_respected() -> None:
    assert not srm_test({"a": 900, "b": 100}, {"a": 9, "b": 1}).mismatch
    assert srm_test({"a": 500, "b": 500}, {"a": 9, "b": 1}).mismatch


def test_bad_counts_are_rejected() -> None:
    with pytest.raises(ValueError, match="not arms of the experiment"):
        srm_test({"c": 3}, {"a": 1, "b": 1})
    with pytest.raises(ValueError, match="no exposures"):
        srm_test({}, {"a": 1, "b": 1})


def write_log(path: Path, records: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "not json\n")


def record(user: str, arm: str, forced: bool = False, version: str = "3") -> dict[str, object]:
    return {
        "ts": 1.0, "request_id": "r", "user_id": user, "model_version": "m",
        "index_version": "i", "config_version": version, "sku_ids": [1],
        "exposures": [{"layer": "l", "experiment": "exp", "arm": arm, "bucket": 1,
                       "forced": forced}],
    }  # fmt: skip


def test_exposure_logs_count_distinct_users_and_skip_forced(tmp_path: Path) -> None:
    write_log(
        tmp_path / "a.jsonl",
        [record("u1", "a"), record("u1", "a"), record("u2", "b"), record("qa", "b", True)],
    )
    write_log(tmp_path / "b.jsonl", [record("u3", "a", version="1")])
    paths = sorted(tmp_path.glob("*.jsonl"))
    users = count_exposures(paths, "exp")
    assert users.counts == {"a": 2, "b": 1}
    assert users.skipped == 2
    assert count_exposures(paths, "exp", unique_users=False).counts == {"a": 3, "b": 1}
    assert count_exposures(paths, "exp", since_version=2).counts == {"a": 1, "b": 1}
    assert count_exposures(paths, "other").counts == {}
