"""Breaking one column of the online feature store's user rows, and restoring it."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from recsys.ranking.feature_store import publish_user_vectors, user_key
from recsys.simulation.feature_fault import FeatureStoreMissing, OnlineFeatureFault
from recsys.simulation.scenarios import BrokenFeature, FeatureFault, make_scenario

USERS = np.array(["user-0000000", "user-0000001", "user-0000002"])
WIDTH = 7  # three vector/affinity columns, then price mean, activity, home lat, home lon


def rows() -> np.ndarray:
    return np.arange(len(USERS) * WIDTH, dtype=np.float64).reshape(len(USERS), WIDTH)


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (FeatureFault("user_price_mean", "nan"), np.nan),
        (FeatureFault("user_activity", "constant", 2.5), 2.5),
    ],
)
def test_a_fault_changes_one_column_of_every_row_and_restore_puts_the_bytes_back(
    redis_url: str, redis_prefix: str, fault: FeatureFault, expected: float
) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        publish_user_vectors(client, redis_prefix, "f1", USERS, rows())
        keys = [user_key(redis_prefix, "f1", u) for u in USERS.tolist()]
        before = client.mget(keys)
        broken = OnlineFeatureFault(redis_url, redis_prefix, "f1", USERS, WIDTH, fault)
        broken.check()
        assert broken.inject() == len(USERS)
        values = client.mget(keys)
        assert all(isinstance(v, bytes) for v in values)
        after = np.stack([np.frombuffer(v, np.float64) for v in values if isinstance(v, bytes)])
        column = fault.index(WIDTH)
        np.testing.assert_array_equal(after[:, column], np.full(len(USERS), expected))
        others = np.delete(np.arange(WIDTH), column)
        np.testing.assert_array_equal(after[:, others], rows()[:, others])
        assert broken.restore() == len(USERS)
        assert client.mget(keys) == before
        broken.close()
    finally:
        client.close()


def test_a_store_without_rows_is_refused_with_the_way_to_publish_them(
    redis_url: str, redis_prefix: str
) -> None:
    fault = FeatureFault("user_price_mean", "nan")
    broken = OnlineFeatureFault(redis_url, redis_prefix, "f1", USERS, WIDTH, fault)
    with pytest.raises(FeatureStoreMissing, match="recsys features publish"):
        broken.check()
    broken.close()


def test_the_broken_column_must_be_one_of_the_named_ones() -> None:
    scenario = BrokenFeature(column="user_vector_3")
    assert make_scenario("broken-feature") == BrokenFeature()
    with pytest.raises(ValueError, match="user_price_mean"):
        scenario.shift(None, None, np.random.default_rng(0))  # type: ignore[arg-type]
