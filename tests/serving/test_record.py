"""The exposure record: every field replay needs, at the precision it needs."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np

from recsys.replay import LoggedRequest
from recsys.serving.record import RECORD_VERSION, ExposureRecord
from recsys.types import Encodings, Exposure, Location, Recommendation, Request, ScoredItems


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


FIELD_ORDER = [
    "record", "ts", "request_id", "snapshot_id", "user_id", "surface", "platform",
    "has_location", "location", "num_results", "exclude_sku_ids", "hour", "cached", "answer_of",
    "model_version", "index_version", "config_version", "exposures", "degraded", "degraded_reasons",
    "degraded_reason", "sku_ids", "restaurant_ids", "scores", "user_features", "candidates",
]  # fmt: skip


def test_a_cache_hit_shares_the_answers_encoded_fields_and_writes_its_own_request() -> None:
    """The answer's part of the line is encoded once (kept in its Encodings) and every hit's
    line is the same as one encoded whole: own request id, time and request fields."""
    first = _record(candidates=True, location=True)
    plain = first.to_json()  # no Encodings: everything encoded for this line
    answer = replace(first.recommendation, encodings=Encodings())
    line = replace(first, recommendation=answer).to_json()
    assert line == plain
    assert answer.encodings is not None
    assert answer.encodings.record is not None
    hit_request = replace(first.request, request_id="req-2", location=Location(52.501, 13.401))
    hit = ExposureRecord(
        1_700_000_001.5, hit_request, replace(answer, request_id="req-2", cached=True)
    )
    hit_line = hit.to_json()
    assert hit_line.endswith("\n")
    assert hit_line.count("\n") == 1
    parsed = json.loads(hit_line)
    assert list(parsed) == FIELD_ORDER
    assert (parsed["request_id"], parsed["ts"], parsed["location"]) == (
        "req-2",
        1_700_000_001.5,
        [52.501, 13.401],
    )
    uncached = replace(hit.recommendation, encodings=None)
    expected = json.loads(replace(hit, recommendation=uncached).to_json())
    assert parsed == expected
    assert list(json.loads(plain)) == FIELD_ORDER
