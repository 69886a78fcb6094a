"""The ``monitor`` stage: the served items' features and scores binned into each model version's
training baseline, counted per (model version, arm).

What is binned is what users are shown (the arranged items), because that is the population the
baseline describes: training rows are logged impressions. The feature rows come from the rank
stage (``Batch.ranked_features``) and the served items' places among the candidates from the
arrange stage (``Batch.served_positions``), so nothing is recomputed: one ``searchsorted`` finds
the served rows, every column is binned with one ``searchsorted`` (or one table lookup), and all
counts of a model version come from one ``bincount``. Requests answered in retrieval order
(no time to rank) have no feature rows and are not counted. The stage only reads the batch; it
never changes what is served.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Protocol

import numpy as np

from recsys.monitoring.baseline import BaselineBins
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


class MonitorSnapshot(Protocol):
    """The part of the serving snapshot the monitor stage reads."""

    @property
    def baselines(self) -> Mapping[str, BaselineBins]:
        """Compiled training baselines by model version (a version without one is skipped)."""
        ...


class Monitor:
    """Needs ``served_positions``, ``ranked_features``; sets ``drift_counts``."""

    name = "monitor"

    def run(self, batch: Batch, snapshot: MonitorSnapshot) -> Batch:
        features = batch.ranked_features
        if features is None or features.shape[0] == 0 or not batch.served_positions:
            return batch
        n = len(batch)
        counts = batch.candidate_counts
        starts = np.cumsum(counts) - counts
        served = np.array([p.size for p in batch.served_positions], dtype=np.int64)
        flat = np.concatenate(batch.served_positions) + np.repeat(starts, served)
        request = np.repeat(np.arange(n, dtype=np.int64), served)
        scores = batch.scores
        assert scores is not None  # ranked_features implies the rank stage ran
        # The served rows that the model scored, and their feature rows.
        ranked = batch.ranked_rows
        at = np.minimum(np.searchsorted(ranked, flat), ranked.size - 1)
        matched = ranked[at] == flat
        rows, request, flat = at[matched], request[matched], flat[matched]

        arms = [arm_label(a.exposures) for a in batch.assignments]
        out: list[tuple[str, str, int, Int64Array]] = []
        for version in sorted(set(batch.model_versions)):
            bins = snapshot.baselines.get(version)
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
            )[request]  # one entry per request, then spread to its rows
            take = group >= 0
            if not take.any():
                continue
            binned = bins.count(features[rows[take]], scores[flat[take]], group[take], len(labels))
            requests = np.bincount(
                np.unique(request[take] * len(labels) + group[take]) % len(labels),
                minlength=len(labels),
            )
            out.extend((version, arm, int(requests[i]), binned[i]) for i, arm in enumerate(labels))
        return replace(batch, drift_counts=tuple(out))
