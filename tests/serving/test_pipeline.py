"""The real batch function on a small built world: two-phase cuts, deadlines, the result cache."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

from recsys.pipeline.snapshot import ServingSnapshot
from recsys.pipeline.stages import build_stages
from recsys.ranking.stages import DEADLINE_UNRANKED, Rank, RankCost
from recsys.retrieval.retriever import RetrievalQuery
from recsys.serving.batching import DeadlineExceeded, MicroBatcher
from recsys.serving.cache import ResultCache
from recsys.serving.pipeline import Job, Pipeline, recommend_batch
from recsys.serving.record import answer_fields
from recsys.serving.wire import response_bytes, to_response
from recsys.stage import Stage
from recsys.types import Assignment, PipelineParams, Recommendation, Request

KNOWN_USER = "user-0000001"


@pytest.fixture(scope="module")
def state(serving_snapshot: ServingSnapshot) -> ServingSnapshot:
    return serving_snapshot


PLAN = build_stages()
STAGES = PLAN.batched


def _with_cost(cost: RankCost) -> tuple[Stage[ServingSnapshot], ...]:
    """The batched stages with a rank stage that believes ranking costs ``cost``."""
    return tuple(Rank(cost) if isinstance(s, Rank) else s for s in STAGES)


def _job(state: ServingSnapshot, deadline: float | None = None, **params: object) -> Job:
    request = Request(request_id="r", user_id=KNOWN_USER, num_results=10)
    assignment = Assignment((), PipelineParams(max_per_restaurant=100, **params), "1")  # type: ignore[arg-type]
    return Job(request, assignment, state, deadline)


def _served(result: Recommendation | Exception) -> Recommendation:
    assert isinstance(result, Recommendation), result
    return result


def _retrieved(state: ServingSnapshot, k: int) -> np.ndarray:
    row = int(state.tables.user_rows([KNOWN_USER])[0])
    (cand,) = state.retriever.retrieve_batch(
        [RetrievalQuery(user_row=row, location=None, k=k, nprobe=0, radius_km=8.0)]
    )
    return cand.sku_ids


def test_a_cut_ranks_only_the_first_phase_best_and_no_cut_ranks_all(state: ServingSnapshot) -> None:
    full, cut = (
        _served(r)
        for r in recommend_batch([_job(state, retrieval_k=200), _job(state, rank_cut=15)], STAGES)
    )
    assert set(cut.items.sku_ids.tolist()) <= set(_retrieved(state, 200)[:15].tolist())
    assert not cut.degraded
    # Without a cut, the model's choice reaches past the retrieval top 15 (it re-ranks).
    assert not set(full.items.sku_ids.tolist()) <= set(_retrieved(state, 200)[:15].tolist())


def test_too_little_time_to_rank_answers_in_retrieval_order_flagged_degraded(
    state: ServingSnapshot,
) -> None:
    slow = RankCost(seconds_per_row=10.0)  # as if ranking took 10 s a row
    (rec,) = recommend_batch([_job(state, deadline=time.perf_counter() + 30)], _with_cost(slow))
    served = _served(rec)
    assert DEADLINE_UNRANKED in served.degraded_reasons
    assert served.items.sku_ids.tolist() == _retrieved(state, 200)[:10].tolist()
    (relaxed,) = recommend_batch([_job(state, deadline=time.perf_counter() + 30)], STAGES)
    assert not _served(relaxed).degraded


def test_in_one_batch_only_the_late_request_keeps_retrieval_order(state: ServingSnapshot) -> None:
    slow = RankCost(seconds_per_row=10.0)
    late, on_time = (
        _served(r)
        for r in recommend_batch(
            [_job(state, deadline=time.perf_counter() + 30), _job(state)], _with_cost(slow)
        )
    )
    assert late.degraded_reasons == (DEADLINE_UNRANKED,)
    assert late.items.sku_ids.tolist() == _retrieved(state, 200)[:10].tolist()
    (alone,) = recommend_batch([_job(state)], STAGES)
    assert not on_time.degraded
    assert on_time.items.sku_ids.tolist() == _served(alone).items.sku_ids.tolist()
    assert np.array_equal(on_time.items.scores, _served(alone).items.scores)


def test_a_deadline_that_passed_in_the_queue_fails_only_that_request(
    state: ServingSnapshot,
) -> None:
    late, fine = recommend_batch(
        [_job(state, deadline=time.perf_counter() - 1), _job(state)], STAGES
    )
    assert isinstance(late, DeadlineExceeded)
    assert len(_served(fine).items) == 10


async def test_a_repeated_request_is_served_from_the_cache_until_the_snapshot_changes(
    state: ServingSnapshot,
) -> None:
    calls: list[int] = []

    def counting(jobs: list[Job]) -> list[Recommendation | Exception]:
        calls.append(len(jobs))
        return recommend_batch(jobs, STAGES)

    async with MicroBatcher(counting, max_delay=0) as batcher:
        pipeline = Pipeline(state, batcher, PLAN, cache=ResultCache(100))
        request = Request(request_id="a", user_id=KNOWN_USER, num_results=10)
        first = await pipeline.recommend(request)
        again = await pipeline.recommend(replace(request, request_id="b"))
        assert len(calls) == 1
        assert again.request_id == "b"
        assert again.items.sku_ids.tolist() == first.items.sku_ids.tolist()
        assert again.stage_seconds == (("cache", 0.0),)  # no stage ran, not even assign
        assert again.cached
        assert not first.cached
        assert again.exposures == first.exposures
        pipeline.swap(replace(state))  # any control-plane change is a new snapshot
        await pipeline.recommend(replace(request, request_id="c"))
        assert len(calls) == 2


def test_unranked_answers_stay_out_of_the_live_score_histograms(state: ServingSnapshot) -> None:
    from recsys.serving.metrics import ServingMetrics

    metrics = ServingMetrics()
    slow = RankCost(seconds_per_row=10.0)
    (late,) = recommend_batch([_job(state, deadline=time.perf_counter() + 30)], _with_cost(slow))
    (ranked,) = recommend_batch([_job(state)], STAGES)
    metrics.observe_recommendation(_served(late))
    assert (
        metrics.registry.get_sample_value(
            "recsys_live_score_bucket", {"model_version": _served(late).model_version, "le": "+Inf"}
        )
        is None
    )
    metrics.observe_recommendation(_served(ranked))
    assert metrics.registry.get_sample_value(
        "recsys_live_score_bucket", {"model_version": _served(ranked).model_version, "le": "+Inf"}
    ) == len(_served(ranked).items)


def test_answers_leave_the_batch_with_their_wire_forms_made(state: ServingSnapshot) -> None:
    """The response and the exposure record's answer part are made in the batch's thread: the
    event loop only prefixes a request id, and a cache hit reuses them."""
    (answer,) = recommend_batch([_job(state)], STAGES)
    served = _served(answer)
    assert served.encodings is not None
    assert served.encodings.response == to_response(served, "").SerializeToString()
    assert served.encodings.record == answer_fields(served)
    assert response_bytes(served) == to_response(served).SerializeToString()
