"""The capture stage: the feature row as the ranker used it, and the sampled candidates."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from recsys.pipeline.capture import Capture, sampled
from recsys.pipeline.snapshot import ServingSnapshot
from recsys.pipeline.stages import build_stages
from recsys.ranking.features import user_feature_rows
from recsys.stage import Batch, run_stages
from recsys.types import Request
from tests.serving.test_pipeline import state

__all__ = ["state"]


def _run(snapshot: ServingSnapshot, share: float, ids: list[tuple[str, str]]) -> Batch:
    plan = build_stages(share)
    requests = tuple(Request(request_id=i, user_id=u, num_results=5) for i, u in ids)
    batch = run_stages(plan.per_request, Batch(requests=requests), snapshot)
    return run_stages(plan.batched, batch, snapshot)


def test_sampling_by_request_id_is_deterministic_and_near_the_share() -> None:
    ids = [f"request-{n}" for n in range(20_000)]
    share = sum(sampled(i, 0.1) for i in ids) / len(ids)
    assert 0.09 < share < 0.11
    assert [sampled(i, 0.1) for i in ids[:100]] == [sampled(i, 0.1) for i in ids[:100]]
    assert not any(sampled(i, 0.0) for i in ids[:100])
    assert all(sampled(i, 1.0) for i in ids[:100])


def test_every_request_keeps_its_feature_row_and_a_full_share_keeps_every_candidate(
    state: ServingSnapshot,
) -> None:
    users = [str(u) for u in state.tables.user_ids[:3]]
    batch = _run(state, 1.0, [(f"r{n}", u) for n, u in enumerate(users)])
    rows = state.tables.user_rows(users).astype(np.int64)
    assert batch.served_features is not None
    np.testing.assert_array_equal(batch.served_features, user_feature_rows(state.tables, rows))
    assert batch.scores is not None
    offsets = np.concatenate([[0], np.cumsum(batch.candidate_counts)])
    for n, logged in enumerate(batch.logged_candidates):
        assert logged is not None
        np.testing.assert_array_equal(logged.sku_ids, batch.candidates[n].sku_ids)
        np.testing.assert_array_equal(logged.scores, batch.scores[offsets[n] : offsets[n + 1]])
        served = set(batch.items[n].sku_ids.tolist())
        assert served <= set(logged.sku_ids.tolist())  # what was shown, and what was not


def test_no_share_keeps_no_candidates(state: ServingSnapshot) -> None:
    batch = _run(state, 0.0, [("r0", str(state.tables.user_ids[0]))])
    assert batch.logged_candidates == (None,)


def test_a_share_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ValueError, match="candidate_share"):
        Capture(1.5)


def test_capture_changes_nothing_that_is_served(state: ServingSnapshot) -> None:
    user = str(state.tables.user_ids[1])
    with_capture = _run(state, 1.0, [("r", user)])
    plan = build_stages(0.0)
    no_capture = replace(plan, batched=plan.batched[:-1])
    batch = run_stages(no_capture.per_request, Batch(requests=(Request("r", user, 5),)), state)
    batch = run_stages(no_capture.batched, batch, state)
    np.testing.assert_array_equal(with_capture.items[0].sku_ids, batch.items[0].sku_ids)
    np.testing.assert_array_equal(with_capture.items[0].scores, batch.items[0].scores)
