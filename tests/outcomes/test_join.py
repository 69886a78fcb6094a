"""The outcome join: late, missing, duplicate and orphan events, counted."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from recsys.outcomes import JoinStats, OutcomeEvent, OutcomeJoiner, join_outcomes
from recsys.outcomes.events import EventKind

T0 = 1_700_000_000.0


def exposure(request_id: str, ts: float, skus: list[int], **extra: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "record": 2,
        "ts": ts,
        "request_id": request_id,
        "user_id": "user-0000001",
        "surface": "home",
        "hour": 13,
        "location": [52.5, 13.4],
        "model_version": "m1",
        "exposures": [{"layer": "ranking", "experiment": "exp", "arm": "b", "bucket": 3}],
        "sku_ids": skus,
        "scores": [1.0 - 0.1 * i for i in range(len(skus))],
        "user_features": [0.5, 1.5],
    }
    record.update(extra)
    return record


def event(request_id: str, sku: int, position: int, kind: EventKind, ts: float) -> OutcomeEvent:
    return OutcomeEvent(request_id, "user-0000001", sku, position, kind, ts)


def test_late_clicks_in_the_window_join_and_later_ones_are_counted_as_late() -> None:
    records = [exposure("r1", T0, [10, 11, 12])]
    events = [
        event("r1", 10, 0, "impression", T0 + 1),
        event("r1", 11, 1, "impression", T0 + 1),
        event("r1", 11, 1, "click", T0 + 240),  # four minutes later: joined
        event("r1", 12, 2, "click", T0 + 601),  # past the 600 s window: late
    ]
    stats = JoinStats()
    [joined] = list(join_outcomes(records, events, late_seconds=600, stats=stats))
    assert joined.impressed.tolist() == [True, True, False]
    assert joined.clicked.tolist() == [False, True, False]
    assert joined.ordered.tolist() == [False, False, False]
    assert (stats.joined, stats.late_dropped, stats.orphans, stats.duplicates) == (3, 1, 0, 0)
    assert joined.complete  # the latest event (T0 + 601) is past the window
    assert joined.exposures == (("ranking", "exp", "b"),)
    assert joined.model_version == "m1"
    assert joined.hour == 13
    assert joined.location == (52.5, 13.4)
    assert joined.sku_ids.dtype == np.int64
    assert joined.scores.dtype == np.float32
    assert joined.user_features is not None
    assert joined.user_features.tolist() == [0.5, 1.5]


def test_missing_impressions_are_implied_by_clicks_and_orders_by_nothing_else() -> None:
    records = [exposure("r1", T0, [10, 11, 12]), exposure("r2", T0 + 5, [20, 21])]
    events = [event("r1", 12, 2, "order", T0 + 30)]  # no impression, no click: an order alone
    stats = JoinStats()
    joined = {j.request_id: j for j in join_outcomes(records, events, stats=stats)}
    assert joined["r1"].impressed.tolist() == [False, False, True]
    assert joined["r1"].clicked.tolist() == [False, False, True]
    assert joined["r1"].ordered.tolist() == [False, False, True]
    # A request nobody reacted to is still emitted, with nothing set.
    assert not joined["r2"].impressed.any()
    assert not joined["r2"].clicked.any()
    assert stats.requests == 2
    assert stats.joined == 1
    assert not joined["r2"].complete  # the data end (T0 + 30) is inside its window


def test_duplicates_orphans_and_unserved_items_are_counted_not_joined() -> None:
    records = [exposure("r1", T0, [10, 11]), exposure("r1", T0 + 1, [99])]
    events = [
        event("r1", 10, 0, "click", T0 + 2),
        event("r1", 10, 0, "click", T0 + 3),  # the same click again
        event("r1", 77, 1, "click", T0 + 2),  # not what position 1 served
        event("nobody", 5, 0, "click", T0 + 2),
    ]
    stats = JoinStats()
    [joined] = list(join_outcomes(records, events, stats=stats))
    assert joined.clicked.tolist() == [True, False]
    assert (stats.joined, stats.duplicates, stats.unserved, stats.orphans) == (1, 1, 1, 1)
    assert stats.duplicate_exposures == 1
    assert stats.exposures == 2


def test_a_record_without_the_served_list_is_counted_as_bad() -> None:
    stats = JoinStats()
    out = list(join_outcomes([{"request_id": "r1"}], [], stats=stats))
    assert out == []
    assert stats.bad_exposures == 1


def test_the_streaming_joiner_waits_for_late_events_and_emits_when_the_window_closes() -> None:
    joiner = OutcomeJoiner(late_seconds=300)
    joiner.add_event(event("r1", 10, 0, "impression", T0 + 1))  # before its exposure is read
    joiner.add_exposure(exposure("r1", T0, [10, 11]))
    joiner.add_exposure(exposure("r2", T0 + 100, [20]))
    assert joiner.advance(T0 + 200) == []
    joiner.add_event(event("r1", 11, 1, "click", T0 + 250))
    [first] = joiner.advance(T0 + 300)
    assert first.request_id == "r1"
    assert first.complete
    assert first.impressed.tolist() == [True, True]
    assert first.clicked.tolist() == [False, True]
    joiner.add_event(event("r1", 10, 0, "click", T0 + 320))  # after r1 was emitted: late
    joiner.add_event(event("ghost", 1, 0, "click", T0 + 320))
    assert joiner.stats.late_dropped == 1
    [second] = joiner.advance(T0 + 400)
    assert second.request_id == "r2"
    assert not second.clicked.any()
    assert joiner.stats.orphans == 0  # the ghost's own window is still open
    assert joiner.advance(T0 + 620) == []
    assert joiner.stats.orphans == 1
    joiner.add_exposure(exposure("r3", T0 + 700, [30]))
    [rest] = joiner.flush()
    assert rest.request_id == "r3"
    assert not rest.complete
    assert joiner.open_requests == 0


def test_late_seconds_must_be_finite_and_not_negative() -> None:
    with pytest.raises(ValueError, match="late_seconds"):
        OutcomeJoiner(late_seconds=-1)
