"""Online quality from joined outcomes: CTR and order rate with Wilson intervals, NDCG@20 of
the served order, per (version, arm) and over all arms; incomplete requests wait."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recsys.monitoring.quality import quality_stats, tumbling_windows
from recsys.monitoring.statistics import wilson_interval
from recsys.outcomes.join import JoinedRequest


def joined(
    rid: str, ts: float, clicked: list[int], ordered: tuple[int, ...] = (), *, arm: str = "b",
    complete: bool = True, version: str = "v1", n: int = 5,
) -> JoinedRequest:  # fmt: skip
    mask = np.zeros(n, dtype=np.bool_)
    click = mask.copy()
    click[clicked] = True
    order = mask.copy()
    order[list(ordered)] = True
    return JoinedRequest(
        request_id=rid,
        ts=ts,
        user_id="u",
        surface="home",
        model_version=version,
        exposures=(("layer", "exp", arm),),
        sku_ids=np.arange(n, dtype=np.int64),
        scores=np.linspace(1, 0, n).astype(np.float32),
        user_features=None,
        impressed=np.ones(n, dtype=np.bool_),
        clicked=click,
        ordered=order,
        complete=complete,
    )


def test_ctr_order_rate_and_ndcg_per_arm_and_over_all_arms() -> None:
    requests = [
        joined("r1", 10.0, [0], (0,), arm="a"),  # the top item clicked and ordered: NDCG 1
        joined("r2", 11.0, [1], arm="b"),  # the second clicked
        joined("r3", 12.0, [], arm="b"),  # nothing clicked: no NDCG
        joined("r4", 13.0, [0], arm="b", complete=False),  # its late window is still open
    ]
    by_key = {(s.model_version, s.arm): s for s in quality_stats(requests, 0.0, 60.0)}
    assert set(by_key) == {("v1", "exp/a"), ("v1", "exp/b"), ("v1", "all")}
    every = by_key[("v1", "all")]
    assert (every.requests, every.impressions, every.clicks, every.orders) == (3, 15, 2, 1)
    assert every.ctr == pytest.approx(2 / 15)
    assert (every.ctr_low, every.ctr_high) == pytest.approx(wilson_interval(2, 15))
    assert every.order_rate == pytest.approx(1 / 15)
    # r2: label 1 at position 1: DCG 1/log2(3), ideal 1/log2(2) = 1
    assert by_key[("v1", "exp/b")].ndcg == pytest.approx(1 / math.log2(3))
    assert every.ndcg == pytest.approx((1 + 1 / math.log2(3)) / 2)
    assert every.ndcg_requests == 2


def test_windows_tumble_by_exposure_time() -> None:
    requests = [joined(f"r{i}", ts, [0]) for i, ts in enumerate([1.0, 30.0, 61.0, 150.0])]
    windows = list(tumbling_windows(requests, 60.0))
    totals = [[s.requests for s in w if s.arm == "all"] for w in windows]
    assert totals == [[2], [1], [1]]
    assert [w[0].start for w in windows] == [0.0, 60.0, 120.0]
