"""The one shape of the request path: a :class:`Batch` passed through an ordered list of stages.

A stage is a small object with a ``name`` and one method, ``run(batch, snapshot) -> batch``. It
reads only its own part of the snapshot (each stage's module says which, as a Protocol) and
returns a new batch with its fields filled in; it knows nothing of gRPC, the batcher, the
executor or Prometheus. :func:`run_stages` is the one timed loop over a list of stages: every
stage's wall time is recorded on the batch, so per-stage latency comes from here and not from
each stage. A new concern (a monitoring tap, a candidate logger) is one more object in the list
built by ``recsys.pipeline.stages.build_stages``.

The batch is frozen: a stage that changes it returns ``dataclasses.replace(batch, ...)`` (or uses
the helpers below), so a stage can never see half of another's work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar

import numpy as np

from recsys.types import (
    Assignment,
    BoolArray,
    Candidates,
    Float32Array,
    Float64Array,
    Int64Array,
    Request,
    ScoredItems,
)

_NO_ROWS: Int64Array = np.zeros(0, dtype=np.int64)

SnapshotT_contra = TypeVar("SnapshotT_contra", contravariant=True)


@dataclass(frozen=True, slots=True)
class Batch:
    """Requests that travel the path together, and what each stage has found for them so far.

    Per-request fields are tuples or arrays in request order. A field a stage has not filled
    yet is empty (or None); a stage that needs one states it in its docstring.
    """

    requests: tuple[Request, ...]
    deadlines: tuple[float | None, ...] = ()
    """``time.perf_counter()`` by which each answer is due; None: no deadline."""
    assignments: tuple[Assignment, ...] = ()
    """Experiment exposures and the merged pipeline parameters (the assign stage)."""
    user_rows: Int64Array = field(default_factory=lambda: _NO_ROWS)
    """Each user's row in the serving feature tables; -1 for an unknown user."""
    user_vectors: Float32Array | None = None
    """[B, dim] the vectors the search uses (the user-features stage)."""
    user_features: Float64Array | None = None
    """[B, width] each user's feature row as the online store served it; None when ranking
    reads the local tables."""
    delivery: Float64Array | None = None
    """[B, 2] where each request delivers to (latitude, longitude): its location, else the
    known user's home; NaN for an unknown user without a location (the user-features stage)."""
    candidates: tuple[Candidates, ...] = ()
    """Retrieval's candidates per request, best first (the retrieve stage)."""
    scores: Float32Array | None = None
    """Final scores of every candidate, concatenated in request order (the rank stage)."""
    model_versions: tuple[str, ...] = ()
    """The model version that scored each request (the rank stage)."""
    ranked_features: Float32Array | None = None
    """[M, features] the feature rows the model scored (the rank stage), for the monitor."""
    ranked_rows: Int64Array = field(default_factory=lambda: _NO_ROWS)
    """Where each row of ``ranked_features`` is among the batch's concatenated candidates."""
    items: tuple[ScoredItems, ...] = ()
    """What each request is answered with (the arrange stage)."""
    served_positions: tuple[Int64Array, ...] = ()
    """Where each served item is among its request's candidates (the arrange stage)."""
    served_features: Float64Array | None = None
    """[B, width] each user's feature row as the ranker used it, for the record (the capture
    stage); rows of unknown users are not meaningful (they are not recorded)."""
    logged_candidates: tuple[ScoredItems | None, ...] = ()
    """For the sampled requests, every ranked candidate with its final score (the capture
    stage); None for the others."""
    drift_counts: tuple[tuple[str, str, int, Int64Array], ...] = ()
    """(model version, arm, requests, slot counts): the served items' features and scores
    binned into that version's training baseline (the monitor stage, ``recsys.monitoring``)."""
    degraded: tuple[tuple[str, ...], ...] = ()
    """Why each answer is degraded (empty: it is not), as the stages found it."""
    stage_seconds: tuple[tuple[str, float], ...] = ()
    """Wall time of each stage the batch went through, in order (:func:`run_stages`)."""

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def candidate_counts(self) -> Int64Array:
        """Candidates per request (0 for every request before retrieval)."""
        return np.array([len(c.sku_ids) for c in self.candidates], dtype=np.int64)

    def with_degraded(self, flags: BoolArray | Sequence[bool], reason: str) -> Batch:
        """The batch with ``reason`` added to each request whose flag is set (the batch itself
        when none is: an empty ``degraded`` means no request is degraded)."""
        if len(flags) != len(self.requests):
            raise ValueError(
                f"with_degraded: {len(flags)} flags for {len(self.requests)} requests; "
                "expected one flag per request"
            )
        if not any(flags):
            return self
        current = self.degraded or tuple(() for _ in self.requests)
        return replace(
            self,
            degraded=tuple(
                (*reasons, reason) if flag else reasons
                for reasons, flag in zip(current, flags, strict=True)
            ),
        )


class Stage(Protocol[SnapshotT_contra]):
    """One step of the request path; ``name`` labels its latency metric."""

    name: str

    def run(self, batch: Batch, snapshot: SnapshotT_contra) -> Batch: ...


def run_stages(
    stages: Sequence[Stage[SnapshotT_contra]],
    batch: Batch,
    snapshot: SnapshotT_contra,
    clock: Callable[[], float] = time.perf_counter,
) -> Batch:
    """Run ``stages`` in order over ``batch``, recording each stage's wall time on the batch."""
    timings = list(batch.stage_seconds)
    for stage in stages:
        start = clock()
        batch = stage.run(batch, snapshot)
        timings.append((stage.name, clock() - start))
    return replace(batch, stage_seconds=tuple(timings))
