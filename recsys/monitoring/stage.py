"""The ``monitor`` stage: the served items' features and scores binned into each model version's
training baseline, counted per (model version, arm).

What is binned is what users are shown (the arranged items), because that is the population the
baseline describes: training rows are logged impressions. The feature rows come from the rank
stage (``Batch.ranked_features``) and the served items' places among the candidates from the
arrange stage (``Batch.served_positions``), so nothing is recomputed: one ``searchsorted`` finds
the served rows, and every column of every model version in the batch is binned with one
``searchsorted`` (and one table lookup) over the versions' stacked baselines
(:class:`~recsys.monitoring.baseline.BaselineSet`), and all counts of the batch come from one
``bincount``: the cost does not grow with the number of versions a batch is split over.
Requests answered in retrieval order (no time to rank) have no feature rows and are not
counted. The stage only reads the batch; it never changes what is served.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

import numpy as np

from recsys.monitoring.baseline import BaselineSet
from recsys.stage import Batch
from recsys.types import Exposure, Int64Array

NO_ARM = "none"
"""The arm label of a request in no experiment."""


def arm_label(exposures: tuple[Exposure, ...]) -> str:
    """One label for the arms a request was served by: ``experiment/arm`` joined by ``,``, as
    the outcome join labels them (``JoinedRequest.arm``)."""
    if not exposures:
        return NO_ARM
    return ",".join(f"{e.experiment}/{e.arm}" for e in exposures)


def served_rows(batch: Batch) -> tuple[Int64Array, Int64Array, Int64Array]:
    """The served items the model scored: each one's feature row (into ``ranked_features``),
    its request, and its place among the batch's candidates (into ``scores``). One
    ``searchsorted`` over the ranked rows, none per item."""
    counts = batch.candidate_counts
    starts = np.cumsum(counts) - counts
    served = np.array([p.size for p in batch.served_positions], dtype=np.int64)
    flat = np.concatenate(batch.served_positions) + np.repeat(starts, served)
    request = np.repeat(np.arange(len(batch), dtype=np.int64), served)
    ranked = batch.ranked_rows
    at = np.minimum(np.searchsorted(ranked, flat), ranked.size - 1)
    matched = ranked[at] == flat
    return at[matched], request[matched], flat[matched]


class MonitorSnapshot(Protocol):
    """The part of the serving snapshot the monitor stage reads."""

    @property
    def baselines(self) -> BaselineSet:
        """Compiled training baselines by model version, stacked once per snapshot (a version
        without one is skipped)."""
        ...


class Monitor:
    """Needs ``served_positions``, ``ranked_features``; sets ``drift_counts``."""

    name = "monitor"

    def run(self, batch: Batch, snapshot: MonitorSnapshot) -> Batch:
        features = batch.ranked_features
        if features is None or features.shape[0] == 0 or not batch.served_positions:
            return batch
        n = len(batch)
        scores = batch.scores
        assert scores is not None  # ranked_features implies the rank stage ran
        rows, request, flat = served_rows(batch)

        stacked = snapshot.baselines
        # Each request's (version, arm) code, once for the whole batch: codes order the groups
        # by version, then arm, as the counts are reported; negative for a version without a
        # baseline, whose rows are dropped.
        arms = [arm_label(a.exposures) for a in batch.assignments]
        arm_names = sorted(set(arms))
        arm_of = {name: i for i, name in enumerate(arm_names)}
        n_arms = len(arm_names)
        version = stacked.indices(batch.model_versions)
        code = version * n_arms + np.array([arm_of[a] for a in arms], dtype=np.int64)
        if version.min() < 0:
            take = code[request] >= 0
            rows, request, flat = rows[take], request[take], flat[take]
        row_code = code[request]
        # Reported: every (version, arm) of the batch whose version has a counted row, even
        # an arm with no rows of its own; a version without counted rows is not reported.
        reported = np.zeros((len(stacked), n_arms), dtype=bool)
        reported.ravel()[code[code >= 0]] = True
        counted = np.zeros(len(stacked), dtype=bool)
        counted[row_code // n_arms] = True
        reported &= counted[:, None]
        pairs = np.flatnonzero(reported)
        if pairs.size == 0:
            return replace(batch, drift_counts=())
        group = np.cumsum(reported) - 1  # code -> group
        # Every group's counts in one flat vector, each at its own offset, from one bincount.
        pair_version = pairs // n_arms
        sizes = stacked.sizes[pair_version]
        ends = np.cumsum(sizes)
        begins = ends - sizes
        slots = stacked.slots(
            features, rows, scores[flat], row_code // n_arms, begins[group[row_code]]
        )
        binned = np.bincount(slots, minlength=int(ends[-1]))
        has_rows = np.zeros(n, dtype=bool)
        has_rows[request] = True
        requests = np.bincount(group[code[has_rows]], minlength=pairs.size)
        names = stacked.versions
        out = tuple(
            (names[v], arm_names[a], r, binned[s:e])
            for v, a, r, s, e in zip(
                pair_version.tolist(),
                (pairs % n_arms).tolist(),
                requests.tolist(),
                begins.tolist(),
                ends.tolist(),
                strict=True,
            )
        )
        return replace(batch, drift_counts=out)
