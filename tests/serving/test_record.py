"""The exposure record: every field replay needs, at the precision it needs."""

from __future__ import annotations

import json

import numpy as np

from recsys.replay import LoggedRequest
from recsys.serving.record import RECORD_VERSION, ExposureRecord
from recsys.types import Exposure, Location, Recommendation, Request, ScoredItems


def _record(*, candidates: bool, location: bool) -> ExposureRecord:
    rng = np.random.default_rng(3)
    items = ScoredItems(
        sku_ids=np.array([7, 3, 9], dtype=np.int64),
        restaurant_ids=np.array([1, 1, 2], dtype=np.int64),
        scores=np.array([0.123456789, -1.5, 1e-7], dtype=np.float32),
    )
    everything = ScoredItems(
        sku_ids=np.arange(10, dtype=np.int64)[::-1],  # a view that is not contiguous
        restaurant_ids=np.arange(10, dtype=np.int64),
        scores=rng.random(10).astype(np.float32),
    )
    request = Request(
        request_id="req-1",
        user_id="user-0000001",
        num_results=3,
        location=Location(52.5, 13.4) if location else None,
        surface="near-me",
        platform="ios",
        exclude_sku_ids=(4, 5),
        hour=13,
    )
    recommendation = Recommendation(
        request_id="req-1",
        items=items,
        model_version="m1",
        index_version="i1",
        config_version="7",
        exposures=(Exposure("arrange", "restaurant-cap", "cap-3", 1234, forced=True),),
        degraded_reasons=("a", "b"),
        snapshot_id="0123456789abcdef",
        user_features=rng.random(52),
        candidates=everything if candidates else None,
    )
    return ExposureRecord(1_700_000_000.25, request, recommendation)


def test_a_record_round_trips_every_field_replay_reads() -> None:
    record = _record(candidates=True, location=True)
    line = record.to_json()
    assert line.endswith("\n")
    assert line.count("\n") == 1
    parsed = json.loads(line)
    assert parsed["record"] == RECORD_VERSION
    logged = LoggedRequest.parse(parsed)
    assert logged.request == record.request
    assert logged.exposures == record.recommendation.exposures
    assert logged.snapshot_id == "0123456789abcdef"
    assert logged.sku_ids == (7, 3, 9)
    # float32 scores come back as the same float32, float64 features as the same float64
    served = record.recommendation.items.scores
    assert np.array_equal(np.array(logged.scores, dtype=np.float32), served)
    assert record.recommendation.user_features is not None
    assert logged.user_features == tuple(record.recommendation.user_features.tolist())
    assert logged.degraded_reasons == ("a", "b")
    assert parsed["restaurant_ids"] == [1, 1, 2]
    assert parsed["candidates"]["sku_ids"] == list(range(10))[::-1]
    assert parsed["degraded_reason"] == "a; b"


def test_a_request_without_location_or_sampled_candidates_records_nulls() -> None:
    parsed = json.loads(_record(candidates=False, location=False).to_json())
    assert parsed["location"] is None
    assert parsed["has_location"] is False
    assert parsed["candidates"] is None
    assert LoggedRequest.parse(parsed).request.location is None
