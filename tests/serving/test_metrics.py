from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from recsys.ranking.stages import DEADLINE_UNRANKED, STALE_USER_VECTOR
from recsys.serving.batching import BatchStats
from recsys.serving.metrics import DEFAULT_SCORE_BUCKETS, CappedLabels, ServingMetrics
from recsys.types import Encodings, Exposure, Recommendation, ScoredItems, ServingVersions
from tests.serving.metrics_page import fetch_metrics


def recommendation(
    scores: list[float],
    *,
    exposures: tuple[Exposure, ...] = (),
    degraded: tuple[str, ...] = (),
    model_version: str = "m1",
) -> Recommendation:
    n = len(scores)
    return Recommendation(
        request_id="r",
        items=ScoredItems(
            sku_ids=np.arange(n, dtype=np.int64),
            restaurant_ids=np.arange(n, dtype=np.int64),
            scores=np.asarray(scores, dtype=np.float32),
        ),
        model_version=model_version,
        index_version="i1",
        config_version="c1",
        exposures=exposures,
        degraded_reasons=degraded,
        stage_seconds=(("retrieve", 0.004), ("rank", 0.003)),
    )


def test_capped_labels_admit_up_to_the_cap_then_other() -> None:
    labels = CappedLabels(cap=2, width=3)
    assert labels.admit(("a", "b", "c")) == ("a", "b", "c")
    assert labels.admit(("d", "e", "f")) == ("d", "e", "f")
    assert labels.admit(("g", "h", "i")) == ("other", "other", "other")
    assert labels.admit(("a", "b", "c")) == ("a", "b", "c")


def test_experiment_exposure_label_sets_are_capped() -> None:
    metrics = ServingMetrics(max_exposure_label_sets=3)
    for n in range(5):
        exposure = Exposure("layer", f"exp{n}", "arm", bucket=n)
        metrics.observe_recommendation(recommendation([0.5], exposures=(exposure,)))
    value = metrics.registry.get_sample_value
    labels = {"layer": "layer", "arm": "arm"}
    assert value("recsys_experiment_exposures_total", {**labels, "experiment": "exp2"}) == 1
    assert value("recsys_experiment_exposures_total", {**labels, "experiment": "exp3"}) is None
    other = {"layer": "other", "experiment": "other", "arm": "other"}
    assert value("recsys_experiment_exposures_total", other) == 2


def test_a_recommendation_updates_stages_degraded_and_scores() -> None:
    metrics = ServingMetrics()
    metrics.observe_recommendation(
        recommendation([0.9, 0.2], degraded=(STALE_USER_VECTOR, "slow features"))
    )
    value = metrics.registry.get_sample_value
    assert value("recsys_stage_duration_seconds_count", {"stage": "rank"}) == 1
    assert value("recsys_stage_duration_seconds_sum", {"stage": "retrieve"}) == pytest.approx(0.004)
    # reason: a short enum, never the sentence; a sentence it does not know is "other"
    assert value("recsys_degraded_responses_total", {"reason": "stale_user_vector"}) == 1
    assert value("recsys_degraded_responses_total", {"reason": "other"}) == 1
    assert value("recsys_degraded_responses_total", {"reason": "slow features"}) is None
    assert value("recsys_live_score_bucket", {"model_version": "m1", "le": "0.5"}) == 1
    assert value("recsys_live_score_bucket", {"model_version": "m1", "le": "+Inf"}) == 2


def score_samples(metrics: ServingMetrics, version: str) -> dict[str, float]:
    """The live score histogram of one model version: sample suffix (and le) -> value."""
    found: dict[str, float] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if (
                sample.name.startswith("recsys_live_score")
                and sample.labels.get("model_version") == version
            ):
                suffix = sample.name.removeprefix("recsys_live_score_")
                le = sample.labels.get("le")
                found[f"{suffix}:{le}" if le else suffix] = sample.value
    return found


@settings(max_examples=50, deadline=None)
@given(
    scores=hnp.arrays(
        np.float32,
        st.integers(0, 200),
        elements=st.floats(-8, 8, width=32, allow_nan=False, allow_infinity=False),
    )
)
def test_live_score_buckets_count_scores_at_or_below_each_edge(scores: np.ndarray) -> None:
    metrics = ServingMetrics()
    half = scores.size // 2
    metrics.observe_scores("m", scores[:half])  # two calls accumulate
    metrics.observe_scores("m", scores[half:])
    histogram = score_samples(metrics, "m")
    wide = scores.astype(np.float64)
    expected = {f"bucket:{edge!r}": float((wide <= edge).sum()) for edge in DEFAULT_SCORE_BUCKETS}
    expected["bucket:+Inf"] = float(scores.size)
    # prometheus_client leaves out _sum and _count when an edge is negative (+Inf is the count).
    assert histogram == expected


def test_scores_with_non_negative_edges_also_expose_sum_and_count() -> None:
    metrics = ServingMetrics(score_buckets=[0.25, 0.5, 1.0])
    metrics.observe_scores("m", np.array([0.1, 0.3, 0.3, 0.9, 2.0], dtype=np.float32))
    assert score_samples(metrics, "m") == {
        "bucket:0.25": 1.0,
        "bucket:0.5": 3.0,
        "bucket:1.0": 4.0,
        "bucket:+Inf": 5.0,
        "count": 5.0,
        "sum": pytest.approx(3.6),
    }


def test_a_model_version_can_use_its_training_baseline_edges() -> None:
    metrics = ServingMetrics()
    metrics.set_score_buckets("m2", [0.0, 1.0])
    metrics.observe_scores("m2", np.array([-1.0, 0.5, 3.0], dtype=np.float32))
    value = metrics.registry.get_sample_value
    assert value("recsys_live_score_bucket", {"model_version": "m2", "le": "0.0"}) == 1
    assert value("recsys_live_score_bucket", {"model_version": "m2", "le": "1.0"}) == 2
    assert value("recsys_live_score_bucket", {"model_version": "m2", "le": "+Inf"}) == 3
    with pytest.raises(ValueError, match="strictly increasing"):
        metrics.set_score_buckets("m3", [1.0, 0.0])


def test_version_info_follows_the_pipeline() -> None:
    metrics = ServingMetrics()
    value = metrics.registry.get_sample_value
    metrics.observe_versions(ServingVersions("i1", "c1", {"ranker": "v1", "ranker_b": "v7"}))
    assert value("recsys_model_info", {"name": "ranker", "version": "v1"}) == 1
    assert value("recsys_index_info", {"version": "i1"}) == 1
    metrics.observe_versions(ServingVersions("i2", "c2", {"ranker": "v2"}))
    assert value("recsys_model_info", {"name": "ranker", "version": "v1"}) is None
    assert value("recsys_model_info", {"name": "ranker", "version": "v2"}) == 1
    assert value("recsys_model_info", {"name": "ranker_b", "version": "v7"}) is None
    assert value("recsys_index_info", {"version": "i2"}) == 1
    assert value("recsys_config_info", {"version": "c2"}) == 1


def test_batches_exposure_sink_and_control_plane() -> None:
    metrics = ServingMetrics()
    metrics.observe_batch(BatchStats("rank", 3, (0.001, 0.002, 0.0005), 0.01))
    metrics.exposures_written(5)
    metrics.exposures_dropped(2)
    metrics.set_control_connected("routing", True)
    metrics.set_control_connected("experiments", False)
    metrics.control_document_rejected("routing")
    value = metrics.registry.get_sample_value
    assert value("recsys_batch_size_sum", {"batcher": "rank"}) == 3
    assert value("recsys_batch_queue_delay_seconds_count", {"batcher": "rank"}) == 3
    assert value("recsys_batch_run_seconds_count", {"batcher": "rank"}) == 1
    assert value("recsys_exposure_records_written_total") == 5
    assert value("recsys_exposure_records_dropped_total") == 2
    assert value("recsys_control_plane_connected", {"document": "routing"}) == 1
    assert value("recsys_control_plane_connected", {"document": "experiments"}) == 0
    assert value("recsys_control_rejected_documents_total", {"document": "routing"}) == 1


def test_two_servers_in_one_process_do_not_share_series() -> None:
    first, second = ServingMetrics(), ServingMetrics()
    first.request_started()
    first.request_finished("OK", 0.01)
    assert first.registry.get_sample_value("recsys_requests_total", {"code": "OK"}) == 1
    assert second.registry.get_sample_value("recsys_requests_total", {"code": "OK"}) is None


def test_the_http_endpoint_serves_the_registry_on_a_free_port() -> None:
    metrics = ServingMetrics()
    port = metrics.start_http("127.0.0.1", 0)
    try:
        assert port > 0
        metrics.request_started()
        metrics.request_finished("INVALID_ARGUMENT", 0.002)
        text = fetch_metrics(port)
    finally:
        metrics.stop_http()
    assert 'recsys_requests_total{code="INVALID_ARGUMENT"} 1.0' in text
    assert "recsys_requests_in_flight 0.0" in text
    assert "# TYPE recsys_live_score histogram" in text
    assert "python_gc" not in text  # not the global registry


def test_compile_fallbacks_are_counted_per_model_name() -> None:
    metrics = ServingMetrics()
    metrics.model_compile_fallback("ranker", "v1")
    metrics.model_compile_fallback("ranker", "v2")
    value = metrics.registry.get_sample_value
    assert value("recsys_model_compile_fallbacks_total", {"name": "ranker"}) == 2


def test_the_process_series_are_there() -> None:
    names = {s.name for family in ServingMetrics().registry.collect() for s in family.samples}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= names
    assert "process_start_time_seconds" in names


def test_an_answer_and_its_cache_hits_count_alike_with_its_bucket_counts_made_once() -> None:
    """Every response counts (scores, exposures, stages) whether computed or a hit; the bucket
    counts of one answer are computed once and kept in its Encodings until the edges change."""
    metrics = ServingMetrics(score_buckets=[0.25, 0.5, 1.0])
    arm = Exposure("retrieval", "retrieval-depth", "k200", 3)
    answer = replace(recommendation([0.1, 0.3, 0.9], exposures=(arm,)), encodings=Encodings())
    metrics.observe_recommendation(answer)
    assert answer.encodings is not None
    kept = answer.encodings.score_counts
    assert kept is not None
    hit = replace(answer, request_id="r2", stage_seconds=(("cache", 0.0),), cached=True)
    metrics.observe_recommendation(hit)
    metrics.observe_recommendation(hit)
    assert answer.encodings.score_counts is kept
    value = metrics.registry.get_sample_value
    assert value("recsys_live_score_bucket", {"model_version": "m1", "le": "0.5"}) == 6
    assert value("recsys_live_score_count", {"model_version": "m1"}) == 9
    assert value("recsys_live_score_sum", {"model_version": "m1"}) == pytest.approx(3 * 1.3)
    labels = {"layer": "retrieval", "experiment": "retrieval-depth", "arm": "k200"}
    assert value("recsys_experiment_exposures_total", labels) == 3
    assert value("recsys_stage_duration_seconds_count", {"stage": "cache"}) == 2
    metrics.set_score_buckets("m1", [0.2, 2.0])  # new edges: counted afresh, not the kept ones
    metrics.observe_recommendation(hit)
    assert answer.encodings.score_counts is not kept
    assert value("recsys_live_score_bucket", {"model_version": "m1", "le": "0.2"}) == 1
    assert value("recsys_live_score_count", {"model_version": "m1"}) == 3


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["m1", "m2", "m3"]),
            st.lists(
                st.one_of(
                    st.floats(-2, 3, width=32),
                    st.sampled_from([0.25, 0.5, 1.0, float("nan"), float("inf")]),
                ),
                max_size=25,
            ),
            st.booleans(),
        ),
        max_size=12,
    )
)
def test_a_batch_counted_ahead_gives_the_series_counted_one_answer_at_a_time(
    answers: list[tuple[str, list[float], bool]],
) -> None:
    """Bucketing a whole batch's scores ahead (in the batch's thread) and then observing each
    answer gives the same live score series as observing each answer alone; unranked answers
    and answers with no items are left out either way, and observing reuses the counts."""
    made = [
        replace(
            recommendation(scores, model_version=version, degraded=(DEADLINE_UNRANKED,) * late),
            encodings=Encodings(),
        )
        for version, scores, late in answers
    ]
    alone, ahead = (ServingMetrics(score_buckets=[0.25, 0.5, 1.0]) for _ in range(2))
    for metrics in (alone, ahead):
        metrics.set_score_buckets("m2", [0.0, 2.0])
    ahead.count_scores_ahead(made)
    counted = [a.encodings.score_counts for a in made if a.encodings is not None]
    for answer in made:
        ahead.observe_recommendation(answer)
    kept = [a.encodings.score_counts for a in made if a.encodings is not None]
    assert all(k is c for k, c in zip(kept, counted, strict=True))
    for answer in made:
        alone.observe_recommendation(replace(answer, encodings=Encodings()))
    for version in ("m1", "m2", "m3"):
        for suffix in ("count", "sum"):
            name, labels = f"recsys_live_score_{suffix}", {"model_version": version}
            got = ahead.registry.get_sample_value(name, labels)
            assert got == pytest.approx(alone.registry.get_sample_value(name, labels))
        for le in ("0.0", "0.25", "0.5", "1.0", "2.0", "+Inf"):
            labels = {"model_version": version, "le": le}
            assert ahead.registry.get_sample_value(
                "recsys_live_score_bucket", labels
            ) == alone.registry.get_sample_value("recsys_live_score_bucket", labels)


def test_in_flight_calls_and_status_codes_are_counted() -> None:
    metrics = ServingMetrics()
    value = metrics.registry.get_sample_value
    metrics.request_started()
    metrics.request_started()
    assert value("recsys_requests_in_flight") == 2
    metrics.request_finished("OK", 0.001)
    metrics.request_finished("RESOURCE_EXHAUSTED", 0.001)
    metrics.request_started()
    metrics.request_finished("OK", 0.003)
    assert value("recsys_requests_in_flight") == 0
    assert value("recsys_requests_total", {"code": "OK"}) == 2
    assert value("recsys_requests_total", {"code": "RESOURCE_EXHAUSTED"}) == 1
    assert value("recsys_request_duration_seconds_count") == 3


def test_cache_lookups_are_counted_and_the_entries_gauge_shows_the_last_size() -> None:
    metrics = ServingMetrics()
    value = metrics.registry.get_sample_value
    assert value("recsys_result_cache_entries") == 0
    metrics.observe_cache(False, 0)
    metrics.observe_cache(True, 1)
    metrics.observe_cache(True, 7)
    assert value("recsys_result_cache_lookups_total", {"result": "miss"}) == 1
    assert value("recsys_result_cache_lookups_total", {"result": "hit"}) == 2
    assert value("recsys_result_cache_entries") == 7
