"""Ranking's two stages: the users' feature rows, then the model scores of every candidate.

:class:`UserFeatures` finds each user's row in the feature tables and, when an online feature
store serves user rows, reads the batch's rows from it in one call (the vector part feeds the
search, the rest feeds ranking). :class:`Rank` assembles one feature matrix for the whole batch
(the feature code shared with training), scores it with one predict per routed model version,
applies the two-phase cut, and keeps its own cost account so a request whose deadline leaves no
time to rank is answered in retrieval order instead, flagged.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Protocol

import numpy as np
import numpy.typing as npt

from recsys.ranking.feature_store import UserStore
from recsys.ranking.features import (
    FeatureTables,
    assemble_features,
    user_feature_rows,
    user_row_home,
)
from recsys.ranking.first_phase import combine, survivors
from recsys.ranking.model import RankingModel
from recsys.ranking.routing import RoutingTable
from recsys.stage import Batch
from recsys.types import Float32Array, Float64Array, Int64Array

STALE_USER_VECTOR = "feature store unavailable: user vector from the local copy"
"""Degraded reason of a request whose user row came from the local copy, not the online store."""
DEADLINE_UNRANKED = "deadline: retrieval order, not ranked"
"""Degraded reason of an answer whose deadline left no time to rank: its scores are retrieval
scores, not the model's (the live score histograms skip it)."""
RANK_SECONDS_PER_ROW = 12e-6
"""Starting estimate of features + model time per candidate row, before any batch measured it."""


class UserFeaturesSnapshot(Protocol):
    """The part of the serving snapshot the user-features stage reads."""

    @property
    def tables(self) -> FeatureTables: ...

    @property
    def user_store(self) -> UserStore | None:
        """Where user feature rows are served from; None: the tables themselves."""
        ...


class UserFeatures:
    """Sets ``user_rows`` and, with an online store, ``user_features`` and ``user_vectors``."""

    name = "features"

    def run(self, batch: Batch, snapshot: UserFeaturesSnapshot) -> Batch:
        tables = snapshot.tables
        rows = tables.user_rows([r.user_id for r in batch.requests]).astype(np.int64)
        store = snapshot.user_store
        known = rows >= 0
        if store is None or not known.any():
            safe = np.maximum(rows, 0)
            home = (tables.user_home_lat[safe], tables.user_home_lon[safe])
            return replace(batch, user_rows=rows, delivery=_delivery(batch, known, *home))
        features = user_feature_rows(tables, np.maximum(rows, 0))
        served = store.read(rows[known])
        features[known] = served.vectors
        batch = replace(
            batch,
            user_rows=rows,
            user_features=features,
            user_vectors=np.ascontiguousarray(features[:, : tables.dim], dtype=np.float32),
            delivery=_delivery(batch, known, *user_row_home(features)),
        )
        return batch.with_degraded(known & served.degraded, STALE_USER_VECTOR)


def _delivery(
    batch: Batch, known: npt.NDArray[np.bool_], home_lat: Float64Array, home_lon: Float64Array
) -> Float64Array:
    """[B, 2] each request's location, else its known user's home, else NaN."""
    out = np.full((len(batch), 2), np.nan, dtype=np.float64)
    out[known, 0] = home_lat[known]
    out[known, 1] = home_lon[known]
    for n, request in enumerate(batch.requests):  # one per request, not per candidate
        if request.location is not None:
            out[n] = (request.location.lat, request.location.lon)
    return out


class RankCost:
    """Measured features + model seconds per candidate row (a moving average over batches),
    to tell whether ranking can finish before a request's deadline."""

    def __init__(self, seconds_per_row: float = RANK_SECONDS_PER_ROW) -> None:
        self.seconds_per_row = seconds_per_row

    def observe(self, rows: int, seconds: float) -> None:
        if rows > 0:
            self.seconds_per_row += 0.2 * (seconds / rows - self.seconds_per_row)


class RankSnapshot(Protocol):
    """The part of the serving snapshot the rank stage reads."""

    @property
    def tables(self) -> FeatureTables: ...

    @property
    def models(self) -> Mapping[str, RankingModel]: ...

    @property
    def routing(self) -> RoutingTable: ...

    @property
    def centre(self) -> tuple[float, float]:
        """Where a request with neither a location nor a known user is placed."""
        ...


class Rank:
    """Needs ``candidates``; sets ``scores``, ``model_versions`` and ``ranked_features``."""

    name = "rank"

    def __init__(self, cost: RankCost | None = None) -> None:
        self.cost = cost or RankCost()

    def run(self, batch: Batch, snapshot: RankSnapshot) -> Batch:
        start = time.perf_counter()
        counts = batch.candidate_counts
        cuts = np.array([a.params.rank_cut for a in batch.assignments], dtype=np.int64)
        scored = survivors(counts, cuts)
        # Ranking must finish (with margin for arranging and answering) before each deadline.
        expected = self.cost.seconds_per_row * int(scored.sum())
        deadlines = batch.deadlines or (None,) * len(batch)
        late = np.array(
            [d is not None and d - start < 1.5 * expected + 0.001 for d in deadlines],
            dtype=np.bool_,
        )
        any_late = bool(late.any())
        if any_late:
            scored &= ~np.repeat(late, counts)
        model_scores, versions, features = self._score(batch, snapshot, counts, scored)
        scores = combine(counts, model_scores, scored)
        if any_late:  # a late request keeps its retrieval scores
            retrieval = np.concatenate([c.retrieval_scores for c in batch.candidates])
            kept = np.where(np.repeat(late, counts), retrieval, scores)
            scores = kept.astype(np.float32, copy=False)
        self.cost.observe(features.shape[0], time.perf_counter() - start)
        batch = replace(
            batch,
            scores=scores,
            model_versions=tuple(versions),
            ranked_features=features,
            ranked_rows=np.flatnonzero(scored),
        )
        return batch.with_degraded(late, DEADLINE_UNRANKED)

    @staticmethod
    def _score(
        batch: Batch,
        snapshot: RankSnapshot,
        counts: Int64Array,
        scored: npt.NDArray[np.bool_],
    ) -> tuple[Float32Array, list[str], Float32Array]:
        """Model scores of the ``scored`` rows of the batch (0 elsewhere), and the feature
        matrix of those rows: one feature matrix for the whole batch, one predict per model
        version."""
        items = (
            np.concatenate([c.sku_ids for c in batch.candidates])
            if batch.candidates
            else np.empty(0, np.int64)
        )
        user_rows = batch.user_rows
        lat, lon = _request_points(batch, snapshot)
        served = batch.user_features
        every = bool(scored.all())  # no cut, none late (the common case): no row selection
        take: npt.NDArray[np.bool_] | slice = slice(None) if every else scored
        features = assemble_features(
            snapshot.tables,
            np.repeat(user_rows, counts).astype(np.int32)[take],
            items[take],
            np.repeat(lat, counts)[take],
            np.repeat(lon, counts)[take],
            np.repeat(np.array([r.hour for r in batch.requests], dtype=np.int8), counts)[take],
            None if served is None else np.repeat(served, counts, axis=0)[take],
        )
        versions = [
            snapshot.routing.resolve(a.params.model_name, r.user_id, a.params.model_version)
            for r, a in zip(batch.requests, batch.assignments, strict=True)
        ]
        # One predict per version: rows matched by an integer code per request, not by
        # comparing version strings row by row.
        distinct = sorted(set(versions))
        code = {version: n for n, version in enumerate(distinct)}
        request_codes = np.array([code[v] for v in versions], dtype=np.int32)
        row_code = np.repeat(request_codes, counts)[take] if len(distinct) > 1 else None
        model_scores = np.empty(features.shape[0], dtype=np.float32)
        for n, version in enumerate(distinct):
            rows = slice(None) if row_code is None else row_code == n
            chosen = features[rows]
            if chosen.shape[0]:  # a version whose requests have no scored row: no predict
                model_scores[rows] = snapshot.models[version].predict(chosen)
        if every:
            return model_scores, versions, features
        scores = np.zeros(items.shape[0], dtype=np.float32)
        scores[scored] = model_scores
        return scores, versions, features


def _request_points(batch: Batch, snapshot: RankSnapshot) -> tuple[Float64Array, Float64Array]:
    """Where each request delivers to: its location, else the user's home, else the centre."""
    user_rows = batch.user_rows
    known = user_rows >= 0
    safe_rows = np.where(known, user_rows, 0)
    if batch.user_features is None:
        home_lat = snapshot.tables.user_home_lat[safe_rows]
        home_lon = snapshot.tables.user_home_lon[safe_rows]
    else:
        home_lat, home_lon = user_row_home(batch.user_features)
    lat = np.where(known, home_lat, snapshot.centre[0])
    lon = np.where(known, home_lon, snapshot.centre[1])
    for n, request in enumerate(batch.requests):  # one per request, not per candidate
        if request.location is not None:
            lat[n], lon[n] = request.location.lat, request.location.lon
    return lat.astype(np.float64), lon.astype(np.float64)
