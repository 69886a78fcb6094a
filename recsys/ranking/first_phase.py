"""Two-phase ranking: a cheap first phase over every candidate, the full model on the survivors.

The first phase is the retrieval score itself (the user-item inner product FAISS returns, or
popularity for users served popular items): it costs nothing more, and candidates arrive
already sorted by it. The full LightGBM model (features + trees, ~10 us a row) then scores only
the best ``cut`` candidates of each request; the others follow below every survivor, in
first-phase order. ``cut`` 0 means every candidate is scored (the reference configuration).

Offline quality per cut is measured by ``benchmarks/bench_rank_cut.py`` (NDCG@20 on held-out
sessions against exact top-500 retrieval scored in full), so an experiment arm can pick a cut.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from recsys.types import Float32Array

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]


def _sizes(counts: npt.ArrayLike) -> IntArray:
    """``counts`` as int64 sizes, checked: one size >= 0 per request."""
    sizes = np.asarray(counts, dtype=np.int64)
    if sizes.ndim != 1 or sizes.min(initial=0) < 0:
        raise ValueError(f"counts must be a 1-D array of sizes >= 0, got {sizes!r}")
    return sizes


def positions_in_segments(counts: npt.ArrayLike) -> IntArray:
    """For rows laid out request after request (``counts`` rows each), each row's position
    within its request: ``[0, 1, .., counts[0]-1, 0, 1, ..]``."""
    sizes = _sizes(counts)
    starts = np.cumsum(sizes) - sizes
    return np.arange(int(sizes.sum()), dtype=np.int64) - np.repeat(starts, sizes)


def survivors(counts: npt.ArrayLike, cuts: npt.ArrayLike) -> BoolArray:
    """Rows the full model scores: the first ``cuts[n]`` rows of request ``n`` (rows arrive
    best-first by the first-phase score); a cut of 0 keeps all of that request's rows."""
    sizes = _sizes(counts)
    limit = np.asarray(cuts, dtype=np.int64)
    if limit.shape != sizes.shape:
        raise ValueError(f"cuts has shape {limit.shape}, expected {sizes.shape} like counts")
    if limit.min(initial=0) < 0:
        raise ValueError(f"cuts must be >= 0 (0: no cut), got {limit.min()}")
    if limit.max(initial=0) == 0:  # no request cuts (the served default): every row
        return np.ones(int(sizes.sum()), dtype=np.bool_)
    per_row = np.repeat(np.where(limit > 0, limit, np.iinfo(np.int64).max), sizes)
    return positions_in_segments(sizes) < per_row


def combine(counts: npt.ArrayLike, model_scores: Float32Array, scored: BoolArray) -> Float32Array:
    """One score per row that orders every survivor (by model score) above every other row of
    its request, and the other rows in their first-phase (arrival) order.

    ``model_scores`` is read only where ``scored``. A non-survivor at position p of a request
    whose lowest survivor scores s gets ``s - 1 - p * 1e-3``: below every survivor, in order.
    """
    sizes = np.asarray(counts, dtype=np.int64)
    m = int(sizes.sum())
    if model_scores.shape != (m,) or scored.shape != (m,):
        raise ValueError(
            f"model_scores {model_scores.shape} and scored {scored.shape} must both be ({m},)"
        )
    out = np.asarray(model_scores, dtype=np.float32).copy()
    if bool(scored.all()):
        return out
    request = np.repeat(np.arange(sizes.shape[0]), sizes)
    floor = np.full(sizes.shape[0], np.inf)
    np.minimum.at(floor, request[scored], out[scored].astype(np.float64))
    floor = np.where(np.isfinite(floor), floor, 0.0)
    rest = ~scored
    position = positions_in_segments(sizes)
    out[rest] = (floor[request[rest]] - 1.0 - 1e-3 * position[rest]).astype(np.float32)
    return out
