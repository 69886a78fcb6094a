"""Offline ranking metrics and the training distribution baseline, vectorised over groups.

NDCG is computed for all query groups at once: one lexsort puts every group's rows in score
order, ranks are positions minus the group's start, and per-group sums are ``np.bincount``.
Ties in score are broken pessimistically (the lower label first), so a scorer never earns
credit from ties: a constant scorer gets the worst order, not the logged one.

The distribution baseline summarises each feature (and the score) on the training data, as
decile edges with counts, so a drift monitor can bin live values with :func:`bin_counts` and
compare shares (PSI or similar) against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

DEFAULT_K = 20
BASELINE_QUANTILES = tuple(i / 10 for i in range(1, 10))
"""Inner decile edges: values bin into (-inf, q10], (q10, q20], ..., (q90, inf)."""


def _group_of_rows(
    m: int,
    group_sizes: npt.ArrayLike | None,
    group_ids: npt.ArrayLike | None,
) -> tuple[npt.NDArray[np.int64], int]:
    if (group_sizes is None) == (group_ids is None):
        raise ValueError("pass exactly one of group_sizes or group_ids")
    if group_sizes is not None:
        sizes = np.asarray(group_sizes)
        if sizes.ndim != 1 or not np.issubdtype(sizes.dtype, np.integer):
            raise ValueError(
                f"group_sizes must be a 1-D integer array, got {sizes.dtype}{sizes.shape}"
            )
        if sizes.size and int(sizes.min()) < 0:
            raise ValueError(f"group_sizes must be >= 0, got {int(sizes.min())}")
        if int(sizes.sum()) != m:
            raise ValueError(
                f"group_sizes sum to {int(sizes.sum())}, expected {m} (rows of labels)"
            )
        n_groups = int(sizes.shape[0])
        return np.repeat(np.arange(n_groups, dtype=np.int64), sizes), n_groups
    ids = np.asarray(group_ids)
    if ids.shape != (m,):
        raise ValueError(f"group_ids has shape {ids.shape}, expected ({m},) like labels")
    uniques, inverse = np.unique(ids, return_inverse=True)
    return inverse.astype(np.int64).reshape(m), int(uniques.shape[0])


def _dcg_per_group(
    group: npt.NDArray[np.int64],
    n_groups: int,
    gains: npt.NDArray[np.float64],
    order: npt.NDArray[np.intp],
    k: int,
) -> npt.NDArray[np.float64]:
    """DCG@k of each group when rows are visited in ``order`` (grouped, best first)."""
    m = group.shape[0]
    sorted_group = group[order]
    counts = np.bincount(group, minlength=n_groups)
    starts = np.cumsum(counts) - counts
    rank = np.arange(m) - starts[sorted_group]
    discount = np.where(rank < k, 1.0 / np.log2(rank + 2.0), 0.0)
    dcg = np.bincount(sorted_group, weights=gains[order] * discount, minlength=n_groups)
    return dcg.astype(np.float64, copy=False)


def ndcg_per_group(
    labels: npt.ArrayLike,
    scores: npt.ArrayLike,
    *,
    group_sizes: npt.ArrayLike | None = None,
    group_ids: npt.ArrayLike | None = None,
    k: int = DEFAULT_K,
) -> npt.NDArray[np.float64]:
    """NDCG@k of each group (gain ``2**label - 1``); NaN for groups without a positive label.

    Groups are given either as ``group_sizes`` (rows of a group are contiguous, in order) or as
    one ``group_ids`` value per row (any order). Groups come out in size order or sorted id order.
    """
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if s.shape != y.shape:
        raise ValueError(f"scores has shape {s.shape}, expected {y.shape} like labels")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not np.isfinite(y).all() or (y.size and float(y.min()) < 0):
        raise ValueError("labels must be finite and >= 0")
    if np.isnan(s).any():
        raise ValueError(f"scores contain NaN (first at row {int(np.flatnonzero(np.isnan(s))[0])})")
    group, n_groups = _group_of_rows(y.shape[0], group_sizes, group_ids)
    gains = np.exp2(y) - 1.0
    by_score = np.lexsort((y, -s, group))  # group, then score descending, then worst label
    ideal = np.lexsort((-y, group))
    dcg = _dcg_per_group(group, n_groups, gains, by_score, k)
    idcg = _dcg_per_group(group, n_groups, gains, ideal, k)
    out = np.full(n_groups, np.nan)
    positive = idcg > 0
    out[positive] = dcg[positive] / idcg[positive]
    return out


def ndcg_at_k(
    labels: npt.ArrayLike,
    scores: npt.ArrayLike,
    *,
    group_sizes: npt.ArrayLike | None = None,
    group_ids: npt.ArrayLike | None = None,
    k: int = DEFAULT_K,
) -> float:
    """Mean NDCG@k over the groups with at least one positive label (see :func:`ndcg_per_group`).

    Raises ``ValueError`` if no group has a positive label: the mean would be undefined.
    """
    per_group = ndcg_per_group(labels, scores, group_sizes=group_sizes, group_ids=group_ids, k=k)
    defined = per_group[~np.isnan(per_group)]
    if defined.size == 0:
        raise ValueError("no group has a positive label; NDCG is undefined")
    return float(defined.mean())


def bin_counts(edges: Sequence[float], values: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Counts of non-NaN ``values`` in the bins ``(-inf, e0], (e0, e1], ..., (e_last, inf)``."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    e = np.asarray(edges, dtype=np.float64)
    return np.bincount(np.searchsorted(e, v, side="left"), minlength=e.shape[0] + 1)


def numeric_distribution(values: npt.ArrayLike) -> dict[str, Any]:
    """Decile edges, counts per bin, missing count, mean, min and max of ``values``."""
    v = np.asarray(values, dtype=np.float64)
    missing = np.isnan(v)
    present = v[~missing]
    if present.size == 0:
        return {"kind": "numeric", "edges": [], "counts": [0], "missing": int(missing.sum())}
    edges = np.unique(np.quantile(present, BASELINE_QUANTILES))
    return {
        "kind": "numeric",
        "edges": edges.tolist(),
        "counts": bin_counts(edges.tolist(), present).tolist(),
        "missing": int(missing.sum()),
        "mean": float(present.mean()),
        "min": float(present.min()),
        "max": float(present.max()),
    }


def categorical_distribution(values: npt.ArrayLike) -> dict[str, Any]:
    """Count of each category code seen in ``values`` (non-negative integer codes)."""
    v = np.asarray(values, dtype=np.float64)
    missing = np.isnan(v)
    codes = v[~missing].astype(np.int64)
    counts = np.bincount(codes) if codes.size else np.zeros(0, dtype=np.int64)
    seen = np.flatnonzero(counts)
    return {
        "kind": "categorical",
        "values": seen.tolist(),
        "counts": counts[seen].tolist(),
        "missing": int(missing.sum()),
    }


def distribution_baseline(
    features: npt.NDArray[np.float32],
    scores: npt.NDArray[np.floating[Any]],
    *,
    names: Sequence[str],
    categorical: Sequence[str],
) -> dict[str, Any]:
    """The training distribution of every feature column and of the model score."""
    if features.ndim != 2 or features.shape[1] != len(names):
        raise ValueError(f"features has shape {features.shape}, expected (rows, {len(names)})")
    if scores.shape != (features.shape[0],):
        raise ValueError(f"scores has shape {scores.shape}, expected ({features.shape[0]},)")
    return {
        "rows": int(features.shape[0]),
        "features": {
            name: (
                categorical_distribution(features[:, i])
                if name in categorical
                else numeric_distribution(features[:, i])
            )
            for i, name in enumerate(names)
        },
        "score": numeric_distribution(scores),
    }
