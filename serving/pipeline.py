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

from experiments.assignment import RequestAttributes
from ranking.features import assemble_features
from recsys.control.store import DocumentStore, open_store
from recsys.settings import ServeSettings
from recsys.types import (
    Assignment,
    Candidates,
    Float32Array,
    Recommendation,
    Request,
    ServingVersions,
)
from retrieval.retriever import RetrievalQuery

from .arrange import arrange
from .batching import MicroBatcher
from .control import ControlFollower, read_documents
from .metrics import ServingMetrics
from .state import EXPERIMENTS, ServingState, StateLoader, artifact_root

__all__ = [
    "Job",
    "Pipeline",
    "RecommendPipeline",
    "ServingVersions",
    "open_pipeline",
    "recommend_batch",
]

UNKNOWN_USER = "unknown user: popular items near the location"


class RecommendPipeline(Protocol):
    async def recommend(self, request: Request) -> Recommendation:
        """Answer one validated request. Never blocks the event loop."""
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


def recommend_batch(jobs: Sequence[Job]) -> list[Recommendation]:
    """Retrieve, rank and arrange a batch: one FAISS search, one predict per model version.

    Runs in an executor thread. Jobs normally share one snapshot; if a swap happened while the
    batch formed, each group of jobs is served by the snapshot it started on.
    """
    out: list[Recommendation | None] = [None] * len(jobs)
    by_state: dict[int, list[int]] = {}
    for i, job in enumerate(jobs):
        by_state.setdefault(id(job.state), []).append(i)
    for positions in by_state.values():
        group = [jobs[i] for i in positions]
        for i, rec in zip(positions, _recommend_same_state(group[0].state, group), strict=True):
            out[i] = rec
    return [r for r in out if r is not None]


def _recommend_same_state(state: ServingState, jobs: Sequence[Job]) -> list[Recommendation]:
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

    scores, versions = _score(state, jobs, user_rows, candidates)
    t2 = time.perf_counter()

    offsets = np.cumsum([0] + [len(c.sku_ids) for c in candidates])
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
            degraded_reasons=(UNKNOWN_USER,) if cand.fallback else (),
            stage_seconds=timings,
        )
        for job, cand, items, version in zip(jobs, candidates, arranged, versions, strict=True)
    ]


def _score(
    state: ServingState,
    jobs: Sequence[Job],
    user_rows: np.ndarray,
    candidates: Sequence[Candidates],
) -> tuple[Float32Array, list[str]]:
    """Feature matrix for every candidate of the batch at once, one predict per model version."""
    counts = np.array([len(c.sku_ids) for c in candidates], dtype=np.int64)
    items = (
        np.concatenate([c.sku_ids for c in candidates])
        if len(candidates)
        else np.empty(0, np.int64)
    )
    lat, lon = _request_points(state, jobs, user_rows)
    features = assemble_features(
        state.tables,
        np.repeat(user_rows, counts).astype(np.int32),
        items,
        np.repeat(lat, counts),
        np.repeat(lon, counts),
        np.repeat(np.array([j.request.hour for j in jobs], dtype=np.int8), counts),
    )
    versions = [
        state.routing.resolve(
            j.assignment.params.model_name, j.request.user_id, j.assignment.params.model_version
        )
        for j in jobs
    ]
    row_version = np.repeat(np.array(versions, dtype=object), counts)
    scores = np.empty(items.shape[0], dtype=np.float32)
    for version in sorted(set(versions)):
        rows = row_version == version
        scores[rows] = state.models[version].predict(features[rows])
    return scores, versions


def _request_points(
    state: ServingState, jobs: Sequence[Job], user_rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Where each request delivers to: its location, else the user's home, else the centre."""
    known = user_rows >= 0
    safe_rows = np.where(known, user_rows, 0)
    lat = np.where(known, state.tables.user_home_lat[safe_rows], state.centre[0])
    lon = np.where(known, state.tables.user_home_lon[safe_rows], state.centre[1])
    for n, job in enumerate(jobs):
        if job.request.location is not None:
            lat[n], lon[n] = job.request.location.lat, job.request.location.lon
    return lat.astype(np.float64), lon.astype(np.float64)


class Pipeline:
    """The live pipeline: a snapshot swapped by reference, a micro-batcher, control followers."""

    def __init__(
        self,
        state: ServingState,
        batcher: MicroBatcher[Job, Recommendation],
        follower: ControlFollower | None = None,
        store: DocumentStore | None = None,
    ) -> None:
        self._state = state
        self._batcher = batcher
        self._follower = follower
        self._store = store

    @property
    def state(self) -> ServingState:
        return self._state

    def swap(self, state: ServingState) -> None:
        self._state = state  # one reference: readers never lock

    async def recommend(self, request: Request) -> Recommendation:
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
        rec = await self._batcher.submit(Job(request, assignment, state))
        return replace(rec, stage_seconds=(("assign", assigned - start), *rec.stage_seconds))

    def versions(self) -> ServingVersions:
        return self._state.versions()

    async def close(self) -> None:
        if self._follower is not None:
            await self._follower.close()
        await self._batcher.close()
        if self._store is not None:
            await asyncio.to_thread(self._store.close)


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
        recommend_batch(pinned)


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
    loader = StateLoader(root)
    state = await asyncio.to_thread(
        loader.initial,
        {name: doc.body for name, doc in docs.items()},
        str(docs[EXPERIMENTS].version) if EXPERIMENTS in docs else "0",
    )
    await asyncio.to_thread(warm_up, state)
    batcher: MicroBatcher[Job, Recommendation] = MicroBatcher(
        recommend_batch,
        name="recommend",
        max_batch_size=settings.batch_max_size,
        max_delay=settings.batch_max_delay_ms / 1000,
        max_concurrent_batches=settings.executor_threads,
        observer=metrics.observe_batch,
    )
    pipeline = Pipeline(state, batcher, store=store)
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
