"""The monitor stage bins a batch split over many model versions in one pass, and reports
exactly what binning each version's rows on their own reports (the stage's first algorithm,
kept below as the reference)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.monitoring.baseline import BaselineBins, BaselineSet
from recsys.monitoring.stage import Monitor, arm_label, served_rows
from recsys.ranking.evaluation import distribution_baseline
from recsys.stage import Batch
from recsys.types import Assignment, Candidates, Exposure, Int64Array, PipelineParams, Request

MATRIX = ("price", "cuisine", "distance", "hour")
"""The columns of the ranked feature matrix in these tests."""

DriftCounts = tuple[tuple[str, str, int, Int64Array], ...]


@dataclass(frozen=True)
class Snapshot:
    baselines: BaselineSet


def reference_drift_counts(batch: Batch, baselines: Mapping[str, BaselineBins]) -> DriftCounts:
    """The stage's first algorithm: per model version, its arms' labels and groups by Python
    over the batch, then that version's rows binned on their own."""
    features, scores = batch.ranked_features, batch.scores
    assert features is not None
    assert scores is not None
    rows, request, flat = served_rows(batch)  # which rows: shared; how they are binned: not
    arms = [arm_label(a.exposures) for a in batch.assignments]
    out: list[tuple[str, str, int, Int64Array]] = []
    for version in sorted(set(batch.model_versions)):
        bins = baselines.get(version)
        if bins is None:
            continue
        labels = sorted(
            {a for a, v in zip(arms, batch.model_versions, strict=True) if v == version}
        )
        group = np.array(
            [
                labels.index(a) if v == version else -1
                for a, v in zip(arms, batch.model_versions, strict=True)
            ],
            dtype=np.int64,
        )[request]
        take = group >= 0
        if not take.any():
            continue
        binned = bins.count(features[rows[take]], scores[flat[take]], group[take], len(labels))
        requests = np.bincount(
            np.unique(request[take] * len(labels) + group[take]) % len(labels),
            minlength=len(labels),
        )
        out.extend((version, arm, int(requests[i]), binned[i]) for i, arm in enumerate(labels))
    return tuple(out)


def baseline_of(seed: int, names: Sequence[str]) -> dict[str, object]:
    """A training baseline of ``names`` (a subset of MATRIX) whose edges depend on ``seed``."""
    rng = np.random.default_rng(seed)
    rows = 400
    columns = {
        "price": rng.lognormal(2.0 + seed % 3 * 0.2, 0.5, rows),
        "cuisine": rng.integers(0, 4 + seed % 3, rows).astype(np.float64),
        "distance": rng.exponential(2.0 + seed % 5, rows),
        "hour": rng.integers(6, 23, rows).astype(np.float64),
    }
    features = np.column_stack([columns[name] for name in names]).astype(np.float32)
    scores = rng.normal(seed % 4 * 0.3, 1.0, rows).astype(np.float32)
    categorical = [name for name in ("cuisine", "hour") if name in names]
    return distribution_baseline(features, scores, names=names, categorical=categorical)


def compiled(versions: int) -> dict[str, BaselineBins]:
    """Versions with different edges; some monitor fewer columns, one only the score."""
    layouts: tuple[tuple[str, ...], ...] = (
        MATRIX,
        MATRIX,
        ("price", "distance"),
        ("cuisine", "hour", "price"),
        (),
        ("hour", "distance", "cuisine"),
    )
    out = {}
    for v in range(versions):
        names = layouts[v % len(layouts)]
        baseline = baseline_of(v, names) if names else {"score": baseline_of(v, MATRIX)["score"]}
        out[f"v{v:02d}"] = BaselineBins.compile(f"v{v:02d}", baseline, MATRIX)
    return out


EXPOSURES = (
    (),
    (Exposure("models", "home", "a", 1),),
    (Exposure("models", "home", "b", 2),),
    (Exposure("models", "near_me", "a", 3), Exposure("ranking", "cut", "c", 4)),
)


def make_batch(
    rng: np.random.Generator, versions: Sequence[str], n: int, ranked_share: float = 0.7
) -> Batch:
    """``n`` requests over ``versions`` and EXPOSURES: some with no candidates or nothing
    served, some whose candidates were not all (or not at all) ranked; values with NaN, out of
    the training range, codes never seen and negative codes."""
    candidates = rng.integers(0, 40, n)
    ranked = []
    for k in candidates.tolist():
        kind = rng.random()
        if kind < ranked_share:
            ranked.append(np.ones(k, dtype=bool))
        elif kind < (1 + ranked_share) / 2:
            ranked.append(rng.random(k) < 0.5)
        else:
            ranked.append(np.zeros(k, dtype=bool))
    ranked_rows = np.flatnonzero(np.concatenate(ranked)).astype(np.int64)
    m = ranked_rows.size
    features = np.column_stack(
        [
            rng.lognormal(2.2, 0.8, m),
            rng.integers(-1, 8, m),
            rng.exponential(4.0, m),
            rng.integers(0, 24, m),
        ]
    ).astype(np.float32)
    features[rng.random(features.shape) < 0.05] = np.nan
    total = int(candidates.sum())
    scores = rng.normal(0.2, 1.5, total).astype(np.float32)
    scores[rng.random(total) < 0.02] = np.nan
    return Batch(
        requests=tuple(Request(f"r{i}", f"u{i}", 20) for i in range(n)),
        assignments=tuple(
            Assignment(EXPOSURES[int(rng.integers(len(EXPOSURES)))], PipelineParams(), "1")
            for _ in range(n)
        ),
        candidates=tuple(
            Candidates(np.arange(k, dtype=np.int64), np.zeros(k, np.float32))
            for k in candidates.tolist()
        ),
        scores=scores,
        model_versions=tuple(versions[int(rng.integers(len(versions)))] for _ in range(n)),
        ranked_features=features,
        ranked_rows=ranked_rows,
        served_positions=tuple(
            rng.permutation(k)[: int(rng.integers(0, min(k, 20) + 1))].astype(np.int64)
            for k in candidates.tolist()
        ),
    )


def assert_same(found: DriftCounts, expected: DriftCounts) -> None:
    assert [(v, a, r) for v, a, r, _ in found] == [(v, a, r) for v, a, r, _ in expected]
    for (_, _, _, counts), (_, _, _, reference) in zip(found, expected, strict=True):
        assert counts.dtype == np.int64
        np.testing.assert_array_equal(counts, reference)


BASELINES = compiled(24)
STACKED = BaselineSet(BASELINES)
SERVED = (*BASELINES, "unmonitored")
"""The 24 versions and one without a training baseline."""
UNIFORM = {v: b for v, b in BASELINES.items() if b.names == BASELINES["v00"].names}
"""The versions that monitor the same columns (their edges, codes and slot counts differ), as
versions of one model do."""
SAME_WIDTH = {v: b for v, b in BASELINES.items() if len(b.columns) == 4}
"""Versions that monitor as many columns as each other, not the same ones."""


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 48),
    versions=st.integers(1, len(SERVED)),
    ranked_share=st.floats(0.0, 1.0),
    columns=st.sampled_from(["any", "same", "as many"]),
)
def test_a_batch_over_many_versions_counts_as_each_version_alone(
    seed: int, n: int, versions: int, ranked_share: float, columns: str
) -> None:
    rng = np.random.default_rng(seed)
    baselines = {"any": BASELINES, "same": UNIFORM, "as many": SAME_WIDTH}[columns]
    chosen = list(rng.permutation([*baselines, "unmonitored"])[:versions])
    batch = make_batch(rng, chosen, n, ranked_share)
    stacked = STACKED if columns == "any" else BaselineSet(baselines)
    if batch.ranked_features is None or batch.ranked_features.shape[0] == 0:
        assert Monitor().run(batch, Snapshot(stacked)) is batch
        return
    found = Monitor().run(batch, Snapshot(stacked)).drift_counts
    assert_same(found, reference_drift_counts(batch, baselines))


def test_an_arm_without_counted_rows_is_reported_beside_its_versions_others() -> None:
    rng = np.random.default_rng(7)
    batch = make_batch(rng, ["v00"], 2, ranked_share=1.0)
    batch = Batch(
        requests=batch.requests,
        assignments=(Assignment(EXPOSURES[1], PipelineParams(), "1"),) * 2,
        candidates=(
            Candidates(np.arange(3, dtype=np.int64), np.zeros(3, np.float32)),
            Candidates(np.arange(2, dtype=np.int64), np.zeros(2, np.float32)),
        ),
        scores=np.array([0.1, 0.2, 0.3, 0.4, 0.5], dtype=np.float32),
        model_versions=("v00", "v00"),
        ranked_features=np.ones((3, len(MATRIX)), dtype=np.float32),
        ranked_rows=np.array([0, 1, 2], dtype=np.int64),  # the second request's were not ranked
        served_positions=(np.array([2, 0]), np.array([1, 0])),
    )
    other = Batch(
        **{
            **{f: getattr(batch, f) for f in ("requests", "candidates", "scores")},
            "assignments": (Assignment((), PipelineParams(), "1"), batch.assignments[1]),
            "model_versions": batch.model_versions,
            "ranked_features": batch.ranked_features,
            "ranked_rows": batch.ranked_rows,
            "served_positions": batch.served_positions,
        }
    )
    [(version, arm, requests, counts)] = Monitor().run(batch, Snapshot(STACKED)).drift_counts
    assert (version, arm, requests) == ("v00", "home/a", 1)
    assert counts.sum() == 2 * len(BASELINES["v00"].columns)
    found = Monitor().run(other, Snapshot(STACKED)).drift_counts
    assert [(v, a, r) for v, a, r, _ in found] == [("v00", "home/a", 0), ("v00", "none", 1)]
    assert found[0][3].sum() == 0
    assert_same(found, reference_drift_counts(other, BASELINES))


def test_versions_without_a_baseline_or_counted_rows_are_not_reported() -> None:
    rng = np.random.default_rng(8)
    batch = make_batch(rng, ["unmonitored"], 16, ranked_share=1.0)
    assert Monitor().run(batch, Snapshot(STACKED)).drift_counts == ()
    unranked = make_batch(rng, SERVED, 16, ranked_share=0.0)
    if unranked.ranked_features is not None and unranked.ranked_features.shape[0]:
        assert_same(
            Monitor().run(unranked, Snapshot(STACKED)).drift_counts,
            reference_drift_counts(unranked, BASELINES),
        )
    assert Monitor().run(batch, Snapshot(BaselineSet({}))).drift_counts == ()


def test_the_stacked_set_is_the_mapping_it_was_built_from() -> None:
    assert dict(STACKED) == BASELINES
    assert STACKED.versions == tuple(sorted(BASELINES))
    assert STACKED.indices(["v03", "unmonitored", "v00"]).tolist() == [3, -1, 0]
    assert STACKED.sizes.tolist() == [BASELINES[v].size for v in STACKED.versions]
