"""Learned user and item vectors: implicit-feedback matrix factorisation of the history window.

The user x item matrix holds, per pair, the sum of ORDER_WEIGHT per order and CLICK_WEIGHT per
click without an order, from the history window only (``World.history_mask``); impressions
without a click count zero, because negative entries break the low-rank structure a truncated
SVD relies on (measured: they lower the recent-window session AUC). The matrix is BM25-weighted
(item idf, user length normalisation) and factorised with ``scipy.sparse.linalg.svds``; with
``A ~ U S V^T`` a user vector is a row of ``U sqrt(S)`` and an item vector a row of
``V sqrt(S)``, so their inner product is the factorisation's score. The singular values are
soft-thresholded first (nuclear-norm regularisation), which measurably helps: the spectrum of
a click matrix is mostly noise past its first dimensions.

Most SKUs of a large catalogue never got a click. Every item vector is therefore shrunk, by its
interaction count, towards its restaurant's mean vector, which is itself shrunk towards the mean
over items of the same cuisine and category (then of the cuisine, then of everything):
``v = (n v_mf + k p) / (n + k)``. An item nobody clicked gets its prior, never zero.
Users without history get the zero vector.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from scipy.sparse.linalg import svds

from recsys.world import CATEGORIES, CUISINES, World

ORDER_WEIGHT = 3.0
CLICK_WEIGHT = 1.0
BM25_K1 = 1.2
BM25_B = 0.75
SINGULAR_VALUE_SHRINKAGE = 0.8
"""Soft threshold on the singular values, as a fraction of the smallest one kept."""
ITEM_SHRINKAGE = 10.0
"""Pseudo-interactions of the restaurant prior in an item's vector."""
RESTAURANT_SHRINKAGE = 3.0
"""Pseudo-interactions of the cuisine x category prior in a restaurant's mean."""
ITEM_CHUNK = 1 << 19

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Embeddings:
    user_vectors: npt.NDArray[np.float32]  # [U, dim]
    item_vectors: npt.NDArray[np.float32]  # [N, dim]

    @property
    def dim(self) -> int:
        return int(self.item_vectors.shape[1])


def learn_embeddings(
    world: World,
    dim: int = 32,
    seed: int = 7,
    *,
    progress: Callable[[str], None] | None = None,
) -> Embeddings:
    """User and item vectors from the world's history window; deterministic for a seed."""
    if dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim}")
    report = progress or (lambda _msg: None)
    n_users, n_items = world.users.n_users, world.catalogue.n_items

    matrix, seen = _interaction_matrix(world)
    if matrix.nnz == 0:
        raise ValueError(
            "world has no clicks in its history window; cannot learn embeddings "
            f"(n_days={world.meta.n_days}, history_days={world.history_days})"
        )
    counts = _column_counts(matrix)
    report(f"embeddings: {n_users:,} users x {seen.shape[0]:,} clicked items, {matrix.nnz:,} pairs")
    weighted = _bm25(matrix)
    user_mf, item_mf = _factorise(weighted, dim, seed)
    report(f"embeddings: factorised to {dim} dimensions")
    item_vectors = _backoff(item_mf, seen, counts, world)
    report(f"embeddings: {n_items:,} item vectors after backoff")
    return Embeddings(user_vectors=user_mf.astype(np.float32), item_vectors=item_vectors)


def _interaction_matrix(world: World) -> tuple[sp.csr_matrix, IntArray]:
    """[U, seen] summed order/click weights, and the item id of each column."""
    log = world.log
    history = world.history_mask() & np.asarray(log.clicked)
    user = np.asarray(log.user[history], dtype=np.int64)
    item = np.asarray(log.item[history], dtype=np.int64)
    value = np.where(np.asarray(log.ordered[history]), ORDER_WEIGHT, CLICK_WEIGHT)
    seen, column = np.unique(item, return_inverse=True)
    shape = (world.users.n_users, seen.shape[0])
    matrix = sp.csr_matrix((value, (user, column.reshape(-1))), shape=shape)
    matrix.sum_duplicates()
    return matrix, seen


def _column_counts(matrix: sp.csr_matrix) -> FloatArray:
    """Users who interacted with each column: the interaction count used for shrinkage."""
    return np.bincount(matrix.indices, minlength=matrix.shape[1]).astype(np.float64)


def _bm25(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """BM25: saturating in the pair's weight, idf over items, normalised by user length."""
    n_users = matrix.shape[0]
    idf = np.log(n_users) - np.log1p(_column_counts(matrix))
    row_length = np.asarray(matrix.sum(axis=1)).reshape(-1)
    mean_length = row_length[row_length > 0].mean()
    length_norm = (1.0 - BM25_B) + BM25_B * row_length / mean_length
    rows = np.repeat(np.arange(n_users), np.diff(matrix.indptr))
    data = matrix.data * (BM25_K1 + 1.0) / (BM25_K1 * length_norm[rows] + matrix.data)
    data *= np.maximum(idf[matrix.indices], 0.0) + 1e-3  # an item everyone clicked still counts
    return sp.csr_matrix((data, matrix.indices, matrix.indptr), shape=matrix.shape)


def _factorise(matrix: sp.csr_matrix, dim: int, seed: int) -> tuple[FloatArray, FloatArray]:
    """Truncated SVD: (U sqrt(S), V sqrt(S)), zero-padded to ``dim`` if the matrix is smaller."""
    if min(matrix.shape) <= dim + 1:  # too small for ARPACK (k < min(shape)): exact dense SVD
        u, s, vt = np.linalg.svd(matrix.toarray(), full_matrices=False)
    else:
        v0 = np.random.default_rng(seed).standard_normal(min(matrix.shape))
        u, s, vt = svds(matrix, k=dim, v0=v0)
    order = np.argsort(-s, kind="stable")[:dim]  # largest first: leading dimensions carry most
    # Soft-thresholding the spectrum is the nuclear-norm regularised factorisation; the click
    # matrix's spectrum is flat past the first few dimensions, mostly noise.
    kept = s[order]
    root = np.sqrt(np.maximum(kept - SINGULAR_VALUE_SHRINKAGE * kept.min(), 0.0))
    user = np.zeros((matrix.shape[0], dim))
    item = np.zeros((matrix.shape[1], dim))
    user[:, : order.shape[0]] = u[:, order] * root
    item[:, : order.shape[0]] = vt[order].T * root
    user[np.diff(matrix.indptr) == 0] = 0.0  # no clicks in history: unknown, exactly zero
    return user, item


def _group_sum(group: IntArray, values: FloatArray, n_groups: int) -> FloatArray:
    """Row sums of ``values`` per group id, through a sparse indicator matrix (no Python loop)."""
    ones = np.ones(group.shape[0])
    indicator = sp.csr_matrix(
        (ones, (group, np.arange(group.shape[0]))), shape=(n_groups, group.shape[0])
    )
    return np.asarray(indicator @ values)


def _backoff(
    item_mf: FloatArray, seen: IntArray, counts: FloatArray, world: World
) -> npt.NDArray[np.float32]:
    """Each item's own vector, shrunk to its restaurant's, shrunk to its cuisine x category."""
    catalogue = world.catalogue
    n_items, dim = catalogue.n_items, item_mf.shape[1]
    n_groups = len(CUISINES) * len(CATEGORIES)
    item_restaurant = np.asarray(catalogue.item_restaurant, dtype=np.int64)
    cuisine = np.asarray(catalogue.restaurant_cuisine, dtype=np.int64)[item_restaurant]
    group = cuisine * len(CATEGORIES) + np.asarray(catalogue.item_category, dtype=np.int64)

    weighted = item_mf * counts[:, None]  # n_i * v_i: means below are interaction-weighted
    group_sum = _group_sum(group[seen], weighted, n_groups)
    group_n = np.bincount(group[seen], weights=counts, minlength=n_groups)
    cuisine_sum = group_sum.reshape(len(CUISINES), len(CATEGORIES), dim).sum(axis=1)
    cuisine_n = group_n.reshape(len(CUISINES), len(CATEGORIES)).sum(axis=1)
    overall = weighted.sum(axis=0) / counts.sum()
    cuisine_mean = np.where(
        cuisine_n[:, None] > 0, cuisine_sum / np.maximum(cuisine_n, 1e-12)[:, None], overall
    )
    group_mean = np.where(
        group_n[:, None] > 0,
        group_sum / np.maximum(group_n, 1e-12)[:, None],
        np.repeat(cuisine_mean, len(CATEGORIES), axis=0),
    )
    rest_sum = _group_sum(item_restaurant[seen], weighted, catalogue.n_restaurants)
    rest_n = np.bincount(item_restaurant[seen], weights=counts, minlength=catalogue.n_restaurants)

    def prior(items: IntArray | slice) -> FloatArray:
        """The restaurant's mean, shrunk towards the item's cuisine x category mean."""
        r = item_restaurant[items]
        shrunk = rest_sum[r] + RESTAURANT_SHRINKAGE * group_mean[group[items]]
        return np.asarray(shrunk / (rest_n[r] + RESTAURANT_SHRINKAGE)[:, None])

    out = np.empty((n_items, dim), np.float32)
    for lo in range(0, n_items, ITEM_CHUNK):  # chunks bound the [items, dim] float64 temporaries
        rows = slice(lo, lo + ITEM_CHUNK)
        out[rows] = prior(rows)  # an item without clicks is its prior
    own = (weighted + ITEM_SHRINKAGE * prior(seen)) / (counts + ITEM_SHRINKAGE)[:, None]
    out[seen] = own
    return out
