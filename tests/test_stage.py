"""The stage shape: a frozen batch, stages that return a new one, and the one timed loop."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, replace

import numpy as np
import pytest

from recsys.stage import Batch, run_stages
from recsys.types import Request


def _batch(n: int) -> Batch:
    return Batch(requests=tuple(Request(f"r{i}", f"u{i}", 10) for i in range(n)))


class Tick:
    """A stage that records the order it ran in and marks the batch."""

    def __init__(self, name: str, order: list[str]) -> None:
        self.name = name
        self._order = order

    def run(self, batch: Batch, snapshot: object) -> Batch:
        self._order.append(self.name)
        return replace(batch, model_versions=(*batch.model_versions, self.name))


def test_stages_run_in_list_order_and_each_one_is_timed_by_the_loop() -> None:
    order: list[str] = []
    clock = iter([0.0, 0.5, 1.0, 3.0])
    out = run_stages(
        [Tick("a", order), Tick("b", order)], _batch(2), object(), clock=lambda: next(clock)
    )
    assert order == ["a", "b"]
    assert out.model_versions == ("a", "b")
    assert out.stage_seconds == (("a", 0.5), ("b", 2.0))


def test_the_loop_appends_to_the_timings_a_batch_already_carries() -> None:
    start = replace(_batch(1), stage_seconds=(("assign", 0.25),))
    out = run_stages([Tick("x", [])], start, object())
    assert [name for name, _ in out.stage_seconds] == ["assign", "x"]


def test_a_batch_cannot_be_changed_in_place() -> None:
    batch = _batch(1)
    with pytest.raises(FrozenInstanceError):
        batch.scores = np.zeros(1, dtype=np.float32)  # type: ignore[misc]


def test_degraded_reasons_accumulate_per_request_in_stage_order() -> None:
    batch = _batch(3).with_degraded([True, False, True], "first")
    batch = batch.with_degraded(np.array([False, False, True]), "second")
    assert batch.degraded == (("first",), (), ("first", "second"))


def test_a_degraded_flag_per_request_is_required() -> None:
    for flags in ([True], [False], np.zeros(3, dtype=bool)):
        with pytest.raises(ValueError, match="expected one flag per request"):
            _batch(2).with_degraded(flags, "short")


def test_no_flag_set_leaves_the_batch_as_it_was() -> None:
    batch = _batch(2)
    assert batch.with_degraded(np.zeros(2, dtype=bool), "none") is batch
    assert batch.with_degraded([False, False], "none").degraded == ()
    flagged = batch.with_degraded([True, False], "one")
    assert flagged.with_degraded([False, False], "none").degraded == (("one",), ())


def test_candidate_counts_are_zero_length_before_retrieval() -> None:
    assert _batch(2).candidate_counts.tolist() == []
