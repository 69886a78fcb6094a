"""The request pipeline: assign -> retrieve -> rank -> arrange, built in one place.

The server (serving/server.py) only knows the :class:`RecommendPipeline` protocol: it opens the
pipeline at start-up, calls ``recommend`` per request and closes it on shutdown.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import numpy.typing as npt

from recsys.control.backends import open_store
from recsys.control.store import EXPERIMENTS, DocumentStore
from recsys.experiments.assignment import RequestAttributes
from recsys.ranking.features import assemble_features, user_feature_rows, user_row_home
from recsys.ranking.first_phase import combine, survivors
from recsys.retrieval.retriever import RetrievalQuery
from recsys.settings import ServeSettings
from recsys.types import (
    Assignment,
    Candidates,
    Float32Array,
    Recommendation,
    Request,
    ServingVersions,
)

from .arrange import arrange
from .batching import DEADLINE_UNRANKED, DeadlineExceeded, MicroBatcher
from .cache import ResultCache, cache_key
from .control import ControlFollower, read_documents
from .metrics import ServingMetrics
from .state import ServingState, StateLoader, artifact_root

__all__ = [
    "DeadlineExceeded",
    "Job",
    "Pipeline",
    "RecommendPipeline",
    "ServingVersions",
    "open_pipeline",
    "recommend_batch",
]

UNKNOWN_USER = "unknown user: popular items near the location"
STALE_USER_VECTOR = "feature store unavailable: user vector from the local copy"
DEADLINE = DEADLINE_UNRANKED
RANK_SECONDS_PER_ROW = 12e-6
"""Starting estimate of features + model time per candidate row, before any batch measured it."""


class RecommendPipeline(Protocol):
    async def recommend(self, request: Request, deadline: float | None = None) -> Recommendation:
        """Answer one validated request by ``deadline`` (``time.perf_counter()`` seconds, None:
        no deadline). Never blocks the event loop."""
        ...

    def versions(self) -> ServingVersions: ...

    async def close(self) -> None:
        """Finish in-flight work and release resources."""
        ...


@dataclass(frozen=True, slots=True)
class Job:
    """One request on its way through the batched stages, with the snapshot it started on."""

    request: Request
    assignment: Assignment
    state: ServingState
    deadline: float | None = None
    """``time.perf_counter()`` by which the answer is due; None: no deadline."""


class RankCost:
    """Measured features + model seconds per candidate row (a moving average over batches),
    to tell whether ranking can finish before a request's deadline."""

    def __init__(self, seconds_per_row: float = RANK_SECONDS_PER_ROW) -> None:
        self.seconds_per_row = seconds_per_row

    def observe(self, rows: int, seconds: float) -> None:
        if rows > 0:
            self.seconds_per_row += 0.2 * (seconds / rows - self.seconds_per_row)


def recommend_batch(
    jobs: Sequence[Job], cost: RankCost | None = None
) -> list[Recommendation | Exception]:
    """Retrieve, rank and arrange a batch: one FAISS search, one predict per model version.

    Runs in an executor thread. Jobs normally share one snapshot; if a swap happened while the
    batch formed, each group of jobs is served by the snapshot it started on. A job whose
    deadline already passed gets :class:`DeadlineExceeded`; one whose deadline leaves too little
    time to rank (by ``cost``) gets its candidates in retrieval order, flagged degraded.
    """
    cost = cost or RankCost()
    now = time.perf_counter()
    out: list[Recommendation | Exception | None] = [None] * len(jobs)
    by_state: dict[int, list[int]] = {}
    for i, job in enumerate(jobs):
        if job.deadline is not None and job.deadline <= now:
            out[i] = DeadlineExceeded(
                f"request {job.request.request_id}: the deadline passed while it was queued"
            )
        else:
            by_state.setdefault(id(job.state), []).append(i)
    for positions in by_state.values():
        group = [jobs[i] for i in positions]
        recs = _recommend_same_state(group[0].state, group, cost)
        for i, rec in zip(positions, recs, strict=True):
            out[i] = rec
    return [r for r in out if r is not None]


def _recommend_same_state(
    state: ServingState, jobs: Sequence[Job], cost: RankCost
) -> list[Recommendation]:
    t0 = time.perf_counter()
    tables = state.tables
    user_rows = tables.user_rows([j.request.user_id for j in jobs])
    queries = [
        RetrievalQuery(
            user_row=int(row),
            location=j.request.location,
            k=j.assignment.params.retrieval_k,
            nprobe=j.assignment.params.nprobe,
            radius_km=j.assignment.params.radius_km,
            exclude=j.request.exclude_sku_ids,
        )
        for j, row in zip(jobs, user_rows, strict=True)
    ]
    candidates = state.retriever.retrieve_batch(queries)
    t1 = time.perf_counter()

    counts = np.array([len(c.sku_ids) for c in candidates], dtype=np.int64)
    cuts = np.array([j.assignment.params.rank_cut for j in jobs], dtype=np.int64)
    scored = survivors(counts, cuts)
    # Ranking must finish (with margin for arranging and answering) before each deadline.
    expected = cost.seconds_per_row * int(scored.sum())
    late = np.array(
        [j.deadline is not None and j.deadline - t1 < 1.5 * expected + 0.001 for j in jobs],
        dtype=np.bool_,
    )
    scored &= ~np.repeat(late, counts)
    scores, versions = _score(state, jobs, user_rows, candidates, scored)
    retrieval = (
        np.concatenate([c.retrieval_scores for c in candidates])
        if candidates
        else np.empty(0, np.float32)
    )
    scores = np.where(np.repeat(late, counts), retrieval, combine(counts, scores, scored))
    t2 = time.perf_counter()
    cost.observe(int(scored.sum()), t2 - t1)

    offsets = np.concatenate([[0], np.cumsum(counts)])
    restaurants = state.catalogue.item_restaurant
    arranged = []
    for n, (job, cand) in enumerate(zip(jobs, candidates, strict=True)):
        params = job.assignment.params
        arranged.append(
            arrange(
                cand.sku_ids,
                restaurants[cand.sku_ids].astype(np.int64),
                scores[offsets[n] : offsets[n + 1]],
                num_results=job.request.num_results,
                max_per_restaurant=params.max_per_restaurant,
                exclude=np.asarray(job.request.exclude_sku_ids, dtype=np.int64),
            )
        )
    t3 = time.perf_counter()

    timings = (("retrieve", t1 - t0), ("rank", t2 - t1), ("arrange", t3 - t2))
    return [
        Recommendation(
            request_id=job.request.request_id,
            items=items,
            model_version=version,
            index_version=state.index.version,
            config_version=state.assigner.version,
            exposures=job.assignment.exposures,
            degraded_reasons=(
                *((UNKNOWN_USER,) if cand.fallback else ()),
                *((STALE_USER_VECTOR,) if cand.stale_user_vector else ()),
                *((DEADLINE,) if is_late else ()),
            ),
            stage_seconds=timings,
        )
        for job, cand, items, version, is_late in zip(
            jobs, candidates, arranged, versions, late.tolist(), strict=True
        )
    ]


def _score(
    state: ServingState,
    jobs: Sequence[Job],
    user_rows: np.ndarray,
    candidates: Sequence[Candidates],
    scored: npt.NDArray[np.bool_],
) -> tuple[Float32Array, list[str]]:
    """Model scores of the ``scored`` rows of the batch (0 elsewhere): one feature matrix for
    the whole batch, one predict per model version."""
    counts = np.array([len(c.sku_ids) for c in candidates], dtype=np.int64)
    items = (
        np.concatenate([c.sku_ids for c in candidates])
        if len(candidates)
        else np.empty(0, np.int64)
    )
    served_rows = _served_user_rows(state, user_rows, candidates)
    lat, lon = _request_points(state, jobs, user_rows, served_rows)
    features = assemble_features(
        state.tables,
        np.repeat(user_rows, counts).astype(np.int32)[scored],
        items[scored],
        np.repeat(lat, counts)[scored],
        np.repeat(lon, counts)[scored],
        np.repeat(np.array([j.request.hour for j in jobs], dtype=np.int8), counts)[scored],
        None if served_rows is None else np.repeat(served_rows, counts, axis=0)[scored],
    )
    versions = [
        state.routing.resolve(
            j.assignment.params.model_name, j.request.user_id, j.assignment.params.model_version
        )
        for j in jobs
    ]
    row_version = np.repeat(np.array(versions, dtype=object), counts)[scored]
    model_scores = np.empty(features.shape[0], dtype=np.float32)
    for version in sorted(set(row_version.tolist())):
        rows = row_version == version
        model_scores[rows] = state.models[version].predict(features[rows])
    scores = np.zeros(items.shape[0], dtype=np.float32)
    scores[scored] = model_scores
    return scores, versions


def _served_user_rows(
    state: ServingState, user_rows: np.ndarray, candidates: Sequence[Candidates]
) -> npt.NDArray[np.float64] | None:
    """[B, width] each request's user feature row as the online feature store served it
    (None when no request's came from a store: ranking then reads the local tables)."""
    if all(c.user_features is None for c in candidates):
        return None
    rows = user_feature_rows(state.tables, np.maximum(user_rows, 0))
    for n, c in enumerate(candidates):
        if c.user_features is not None:
            rows[n] = c.user_features
    return rows


def _request_points(
    state: ServingState,
    jobs: Sequence[Job],
    user_rows: np.ndarray,
    served_rows: npt.NDArray[np.float64] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Where each request delivers to: its location, else the user's home, else the centre."""
    known = user_rows >= 0
    safe_rows = np.where(known, user_rows, 0)
    if served_rows is None:
        home_lat = state.tables.user_home_lat[safe_rows]
        home_lon = state.tables.user_home_lon[safe_rows]
    else:
        home_lat, home_lon = user_row_home(served_rows)
    lat = np.where(known, home_lat, state.centre[0])
    lon = np.where(known, home_lon, state.centre[1])
    for n, job in enumerate(jobs):
        if job.request.location is not None:
            lat[n], lon[n] = job.request.location.lat, job.request.location.lon
    return lat.astype(np.float64), lon.astype(np.float64)


class Pipeline:
    """The live pipeline: a snapshot swapped by reference, a result cache, a micro-batcher,
    control followers."""

    def __init__(
        self,
        state: ServingState,
        batcher: MicroBatcher[Job, Recommendation],
        follower: ControlFollower | None = None,
        store: DocumentStore | None = None,
        cache: ResultCache | None = None,
        metrics: ServingMetrics | None = None,
    ) -> None:
        self._state = state
        self._batcher = batcher
        self._follower = follower
        self._store = store
        self._cache = cache if cache is not None else ResultCache(0)
        self._metrics = metrics

    @property
    def state(self) -> ServingState:
        return self._state

    def swap(self, state: ServingState) -> None:
        self._state = state  # one reference: readers never lock

    async def recommend(self, request: Request, deadline: float | None = None) -> Recommendation:
        state = self._state
        start = time.perf_counter()
        assignment = state.assigner.assign(
            request.user_id,
            RequestAttributes(
                surface=request.surface,
                platform=request.platform,
                has_location=request.location is not None,
            ),
        )
        assigned = time.perf_counter()
        cache = self._cache
        key = cache_key(request, assignment) if cache.enabled else None
        if key is not None:
            cached = cache.get(state, key)
            if self._metrics is not None:
                self._metrics.observe_cache(cached is not None, len(cache))
            if cached is not None:
                return replace(
                    cached,
                    request_id=request.request_id,
                    exposures=assignment.exposures,
                    stage_seconds=(("assign", assigned - start), ("cache", 0.0)),
                )
        rec = await self._batcher.submit(Job(request, assignment, state, deadline))
        if key is not None and not _transient(rec):
            cache.put(state, key, rec)
        return replace(rec, stage_seconds=(("assign", assigned - start), *rec.stage_seconds))

    def versions(self) -> ServingVersions:
        return self._state.versions()

    async def close(self) -> None:
        if self._follower is not None:
            await self._follower.close()
        await self._batcher.close()
        if self._store is not None:
            await asyncio.to_thread(self._store.close)


def _transient(rec: Recommendation) -> bool:
    """Degraded by a passing condition (a deadline, the feature store down): not to be cached."""
    return DEADLINE in rec.degraded_reasons or STALE_USER_VECTOR in rec.degraded_reasons


def warm_up(state: ServingState) -> None:
    """Run every loaded model and the index through a real batch before taking traffic."""
    users = [str(u) for u in state.tables.user_ids[:8]] + ["warm-up-unknown-user"]
    jobs = [
        Job(
            Request(request_id=f"warm-up-{n}", user_id=u, num_results=20),
            state.assigner.assign(u, RequestAttributes("home", "", False)),
            state,
        )
        for n, u in enumerate(users)
    ]
    for version in state.models:
        pinned = [
            replace(
                j,
                assignment=replace(
                    j.assignment, params=replace(j.assignment.params, model_version=version)
                ),
            )
            for j in jobs
        ]
        for rec in recommend_batch(pinned):
            if isinstance(rec, Exception):
                raise rec


async def open_pipeline(settings: ServeSettings, metrics: ServingMetrics) -> Pipeline:
    """Load, validate and warm the artifacts named by the control plane, then follow it."""
    root = artifact_root(settings.artifacts)
    store = open_store(settings.control, settings.artifacts, prefix=settings.control_prefix)
    seed = open_store("", settings.artifacts) if settings.control else None
    try:
        docs = await asyncio.to_thread(read_documents, store, seed)
    finally:
        if seed is not None:
            seed.close()
    loader = StateLoader(root, on_model_rejected=metrics.model_rejected)
    state = await asyncio.to_thread(
        loader.initial,
        {name: doc.body for name, doc in docs.items()},
        str(docs[EXPERIMENTS].version) if EXPERIMENTS in docs else "0",
        feature_store=settings.feature_store,
        feature_store_prefix=settings.control_prefix,
    )
    await asyncio.to_thread(warm_up, state)
    cost = RankCost()
    batcher: MicroBatcher[Job, Recommendation] = MicroBatcher(
        lambda jobs: recommend_batch(jobs, cost),
        name="recommend",
        max_batch_size=settings.batch_max_size,
        max_delay=settings.batch_max_delay_ms / 1000,
        max_queue_size=settings.max_queue,
        max_queue_delay=settings.max_queue_delay_ms / 1000,
        max_concurrent_batches=settings.executor_threads,
        observer=metrics.observe_batch,
    )
    pipeline = Pipeline(
        state, batcher, store=store, cache=ResultCache(settings.cache_entries), metrics=metrics
    )
    follower = ControlFollower(
        url=settings.control,
        artifacts=settings.artifacts,
        prefix=settings.control_prefix,
        poll_seconds=settings.control_poll_seconds,
        loader=loader,
        get_state=lambda: pipeline.state,
        set_state=pipeline.swap,
        metrics=metrics,
        versions={name: doc.version for name, doc in docs.items()},
    )
    pipeline._follower = follower
    follower.start()
    return pipeline
