"""The live request path: where the stages run.

:class:`Pipeline` answers each request: the per-request stages on the event loop, the result
cache, then the batched stages in an executor thread through the micro-batcher
(:func:`recommend_batch`). The stages themselves and their order come from
:func:`recsys.pipeline.stages.build_stages`; this module only decides where and when they run.
The server (serving/server.py) only knows the :class:`RecommendPipeline` protocol: it opens the
pipeline at start-up, calls ``recommend`` per request and closes it on shutdown.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Protocol

import numpy as np

from recsys.artifacts import make_directories
from recsys.control.backends import open_store
from recsys.control.last_good import LAST_GOOD_DIRECTORY, LastGood
from recsys.control.store import EXPERIMENTS, Document, DocumentStore
from recsys.experiments.stage import Assign
from recsys.pipeline.archive import SnapshotArchive, snapshot_directory
from recsys.pipeline.loading import SnapshotCompiler, artifact_root
from recsys.pipeline.snapshot import ServingSnapshot
from recsys.pipeline.stages import StagePlan, build_stages
from recsys.ranking.model_cache import ModelCache
from recsys.ranking.stages import DEADLINE_UNRANKED, STALE_USER_VECTOR
from recsys.retrieval.index import set_search_threads
from recsys.settings import ServeSettings
from recsys.stage import Batch, Stage, run_stages
from recsys.types import Assignment, Encodings, Recommendation, Request, ServingVersions

from .batching import DeadlineExceeded, MicroBatcher
from .cache import ResultCache, cache_key
from .control import ControlFollower, last_good_instead, read_start_documents
from .drift_metrics import ServingMonitor
from .metrics import ServingMetrics
from .wire import encode_ahead

__all__ = [
    "DeadlineExceeded",
    "Job",
    "Pipeline",
    "RecommendPipeline",
    "ServingVersions",
    "open_pipeline",
    "recommend_batch",
]


class RecommendPipeline(Protocol):
    async def recommend(self, request: Request, deadline: float | None = None) -> Recommendation:
        """Answer one validated request by ``deadline`` (``time.perf_counter()`` seconds, None:
        no deadline). Never blocks the event loop."""
        ...

    def versions(self) -> ServingVersions: ...

    def control_from_last_good(self) -> frozenset[str]:
        """The control documents served from the local last good copies (the store could not
        give them at start) until the store gives a version that applies; for health."""
        ...

    async def close(self) -> None:
        """Finish in-flight work and release resources."""
        ...


@dataclass(frozen=True, slots=True)
class Job:
    """One request on its way to the batched stages, with the snapshot it started on."""

    request: Request
    assignment: Assignment | None
    """Set when a per-request stage assigned it; None: the batched assign stage does."""
    snapshot: ServingSnapshot
    deadline: float | None = None
    """``time.perf_counter()`` by which the answer is due; None: no deadline."""
    stage_seconds: tuple[tuple[str, float], ...] = ()
    """What the per-request stages took before the job was queued."""


def recommend_batch(
    jobs: Sequence[Job],
    stages: Sequence[Stage[ServingSnapshot]],
    monitor: ServingMonitor | None = None,
    metrics: ServingMetrics | None = None,
) -> list[Recommendation | Exception]:
    """Run the batched ``stages`` over ``jobs``: in an executor thread, never on the loop.

    Jobs normally share one snapshot; if a swap happened while the batch formed, each group of
    jobs is served by the snapshot it started on. A job whose deadline already passed gets
    :class:`DeadlineExceeded` and is not run. ``monitor`` accumulates each batch's drift
    counts (the monitor stage's output); ``metrics`` buckets the answers' scores for the live
    score histogram here, per batch, so the per-response count on the loop only adds them; and
    each answer's wire forms are made here too (serving/wire.py), so the loop only prefixes a
    request id and the result cache gets the answer whole.
    """
    now = time.perf_counter()
    out: list[Recommendation | Exception | None] = [None] * len(jobs)
    by_snapshot: dict[int, list[int]] = {}
    for i, job in enumerate(jobs):
        if job.deadline is not None and job.deadline <= now:
            out[i] = DeadlineExceeded(
                f"request {job.request.request_id}: the deadline passed while it was queued"
            )
        else:
            by_snapshot.setdefault(id(job.snapshot), []).append(i)
    for positions in by_snapshot.values():
        group = [jobs[i] for i in positions]
        snapshot = group[0].snapshot
        given = tuple(j.assignment for j in group if j.assignment is not None)
        batch = run_stages(
            stages,
            Batch(
                requests=tuple(j.request for j in group),
                deadlines=tuple(j.deadline for j in group),
                assignments=given if len(given) == len(group) else (),
            ),
            snapshot,
        )
        if monitor is not None:
            monitor.observe(batch, snapshot.baselines)
        answers = _recommendations(group, batch, snapshot)
        if metrics is not None:
            metrics.count_scores_ahead(answers)
        encode_ahead(answers)
        for i, rec in zip(positions, answers, strict=True):
            out[i] = rec
    return [r for r in out if r is not None]


def _recommendations(
    jobs: Sequence[Job], batch: Batch, snapshot: ServingSnapshot
) -> list[Recommendation]:
    degraded = batch.degraded or tuple(() for _ in jobs)
    features = batch.served_features
    logged = batch.logged_candidates or (None,) * len(jobs)
    return [
        Recommendation(
            request_id=job.request.request_id,
            items=items,
            model_version=version,
            index_version=snapshot.index.version,
            config_version=snapshot.assigner.version,
            exposures=assignment.exposures,
            degraded_reasons=reasons,
            stage_seconds=(*job.stage_seconds, *batch.stage_seconds),
            snapshot_id=snapshot.snapshot_id,
            user_features=None if features is None or row < 0 else features[n],
            candidates=candidates,
            computed_for=job.request,
            encodings=Encodings(),
        )
        for n, (job, assignment, items, version, reasons, row, candidates) in enumerate(
            zip(
                jobs,
                batch.assignments,
                batch.items,
                batch.model_versions,
                degraded,
                batch.user_rows.tolist(),
                logged,
                strict=True,
            )
        )
    ]


class Pipeline:
    """The live pipeline: a snapshot swapped by reference, the stage plan, a result cache, a
    micro-batcher, control followers."""

    def __init__(
        self,
        snapshot: ServingSnapshot,
        batcher: MicroBatcher[Job, Recommendation],
        stages: StagePlan,
        follower: ControlFollower | None = None,
        store: DocumentStore | None = None,
        cache: ResultCache | None = None,
        metrics: ServingMetrics | None = None,
        monitor: ServingMonitor | None = None,
    ) -> None:
        self._snapshot = snapshot
        self.monitor = monitor
        """The drift windows of this process (``monitor.stats()``), None when off."""
        self._batcher = batcher
        self._stages = stages
        self._follower = follower
        self._store = store
        self._cache = cache if cache is not None else ResultCache(0)
        self._metrics = metrics
        self._versions_of: ServingSnapshot | None = None
        self._versions = snapshot.versions()

    @property
    def snapshot(self) -> ServingSnapshot:
        return self._snapshot

    @property
    def cached_answers(self) -> int:
        """Answers in the result cache now."""
        return len(self._cache)

    def swap(self, snapshot: ServingSnapshot) -> None:
        self._snapshot = snapshot  # one reference: readers never lock

    async def recommend(self, request: Request, deadline: float | None = None) -> Recommendation:
        snapshot = self._snapshot
        cache = self._cache
        # Looked up before the per-request stages: under one snapshot they are a function of
        # the key's fields (serving/cache.py), so a hit runs no stage at all.
        key = cache_key(request) if cache.enabled else None
        if key is not None:
            cached = cache.get(snapshot, key, request.request_id)
            if self._metrics is not None:
                self._metrics.observe_cache(cached is not None, len(cache))
            if cached is not None:
                return cached
        job = Job(request, None, snapshot, deadline)
        if self._stages.per_request:  # none in the served plan: no batch made per request
            early = run_stages(self._stages.per_request, Batch(requests=(request,)), snapshot)
            assignment = early.assignments[0] if early.assignments else None
            job = replace(job, assignment=assignment, stage_seconds=early.stage_seconds)
        rec = await self._batcher.submit(job)
        if key is not None and not _transient(rec):
            cache.put(snapshot, key, rec)
        return rec

    def versions(self) -> ServingVersions:
        snapshot = self._snapshot
        if snapshot is not self._versions_of:  # built once per snapshot, not per call
            self._versions = snapshot.versions()
            self._versions_of = snapshot
        return self._versions

    def control_from_last_good(self) -> frozenset[str]:
        return frozenset(self._follower.from_last_good) if self._follower else frozenset()

    async def close(self) -> None:
        if self._follower is not None:
            await self._follower.close()
        await self._batcher.close()
        if self.monitor is not None:
            await self.monitor.close()
        if self._store is not None:
            await asyncio.to_thread(self._store.close)


def _transient(rec: Recommendation) -> bool:
    """Degraded by a passing condition (a deadline, the feature store down): not to be cached."""
    return DEADLINE_UNRANKED in rec.degraded_reasons or STALE_USER_VECTOR in rec.degraded_reasons


def warm_up(snapshot: ServingSnapshot, stages: StagePlan) -> None:
    """Run every loaded model and the index through a real batch before taking traffic, and
    build the delivery-cell selectors of the cells where the users live (default radius)."""
    tables = snapshot.tables
    snapshot.retriever.warm_cells(
        np.asarray(tables.user_home_lat, dtype=np.float64),
        np.asarray(tables.user_home_lon, dtype=np.float64),
        snapshot.assigner.config.defaults.radius_km,
    )
    users = [str(u) for u in snapshot.tables.user_ids[:8]] + ["warm-up-unknown-user"]
    requests = tuple(
        Request(request_id=f"warm-up-{n}", user_id=u, num_results=20) for n, u in enumerate(users)
    )
    assigned = run_stages((*stages.per_request, Assign()), Batch(requests=requests), snapshot)
    for version in snapshot.models:  # the batched assign stage keeps these pinned assignments
        pinned = tuple(
            replace(a, params=replace(a.params, model_version=version))
            for a in assigned.assignments
        )
        run_stages(stages.batched, replace(assigned, assignments=pinned), snapshot)


async def open_pipeline(
    settings: ServeSettings, metrics: ServingMetrics, stages: StagePlan | None = None
) -> Pipeline:
    """Load, validate and warm the artifacts named by the control plane, then follow it.

    ``stages``: the request path (default :func:`~recsys.pipeline.stages.build_stages`).
    """
    plan = stages or build_stages(settings.exposure_candidates_share)
    root = artifact_root(settings.artifacts)
    store = open_store(
        settings.control,
        settings.artifacts,
        prefix=settings.control_prefix,
        auth=settings.redis_auth,
    )
    seed = open_store("", settings.artifacts) if settings.control else None
    last_good = LastGood(settings.exposure_path / LAST_GOOD_DIRECTORY)
    if settings.compiled_cache is not None:  # the pod's own cache, parent included: 0700
        await asyncio.to_thread(make_directories, settings.compiled_cache)
    try:
        docs, from_last_good = await asyncio.to_thread(read_start_documents, store, seed, last_good)
    finally:
        if seed is not None:
            seed.close()
    compiler = SnapshotCompiler(
        root,
        ModelCache(
            root,
            on_rejected=metrics.model_rejected,
            compiled_cache=settings.compiled_cache,
            on_fallback=metrics.model_compile_fallback,
        ),
        archive=SnapshotArchive(snapshot_directory(settings.exposure_path)),
    )

    def initial(docs: Mapping[str, Document]) -> ServingSnapshot:
        return compiler.initial(
            {name: doc.body for name, doc in docs.items()},
            str(docs[EXPERIMENTS].version) if EXPERIMENTS in docs else "0",
            versions={name: doc.version for name, doc in docs.items()},
            feature_store=settings.feature_store,
            feature_store_prefix=settings.control_prefix,
            feature_store_timeout_seconds=settings.feature_store_timeout_ms / 1000,
            feature_store_auth=settings.redis_auth,
        )

    try:
        snapshot = await asyncio.to_thread(initial, docs)
    except Exception as e:  # an invalid stored document: try the last good copies, once
        instead = await asyncio.to_thread(last_good_instead, docs, last_good, e)
        if not instead:
            raise
        for name in instead:
            copy = last_good.load(name)
            assert copy is not None
            docs[name] = copy
        from_last_good.update(instead)
        snapshot = await asyncio.to_thread(initial, docs)
    await asyncio.to_thread(warm_up, snapshot, plan)
    monitor = ServingMonitor(
        metrics.registry,
        window_seconds=settings.monitor_window_seconds,
        summary_seconds=settings.monitor_summary_seconds,
        summary_dir=settings.monitor_path,
    )
    batcher: MicroBatcher[Job, Recommendation] = MicroBatcher(
        partial(recommend_batch, stages=plan.batched, monitor=monitor, metrics=metrics),
        name="recommend",
        max_batch_size=settings.batch_max_size,
        max_delay=settings.batch_max_delay_ms / 1000,
        max_queue_size=settings.max_queue,
        max_queue_delay=settings.max_queue_delay_ms / 1000,
        max_concurrent_batches=settings.executor_threads,
        thread_initializer=partial(set_search_threads, settings.search_threads),
        observer=metrics.observe_batch,
    )
    pipeline = Pipeline(
        snapshot,
        batcher,
        plan,
        store=store,
        cache=ResultCache(settings.cache_entries),
        metrics=metrics,
        monitor=monitor,
    )
    monitor.collector.routing = lambda: pipeline.snapshot.routing
    monitor.start()
    follower = ControlFollower(
        url=settings.control,
        artifacts=settings.artifacts,
        prefix=settings.control_prefix,
        poll_seconds=settings.control_poll_seconds,
        compiler=compiler,
        get_snapshot=lambda: pipeline.snapshot,
        set_snapshot=pipeline.swap,
        metrics=metrics,
        versions={name: doc.version for name, doc in docs.items()},
        last_good=last_good,
        from_last_good=from_last_good,
        auth=settings.redis_auth,
    )
    for doc in docs.values():  # the documents the initial snapshot accepted
        if doc.name not in from_last_good:
            await follower.save_last_good(doc)
    pipeline._follower = follower
    follower.start()
    return pipeline
