"""The arrange stage: the feed's business rules over scored candidates, then top-N.

No per-item loop: :func:`arranged_positions` applies the rules to one request,
:func:`arranged_positions_batch` to every request of a batch at once (one sort, one pass of
each rule), which a batch of more than :data:`ONE_BY_ONE_UP_TO` requests takes.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

import numpy as np
import numpy.typing as npt

from recsys.ranking.first_phase import positions_in_segments
from recsys.stage import Batch
from recsys.types import Float32Array, Int64Array, ScoredItems
from recsys.world import Catalogue


def rank_within_group(groups: Int64Array) -> Int64Array:
    """For items already in display order, each item's 0-based position within its group."""
    n = groups.shape[0]
    by_group = np.argsort(groups, kind="stable")
    sorted_groups = groups[by_group]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    run_lengths = np.diff(np.r_[starts, n])
    within = np.arange(n) - np.repeat(starts, run_lengths)
    out = np.empty(n, dtype=np.int64)
    out[by_group] = within
    return out


PREFIX_FACTOR = 4
"""The rules first run on about this many times ``num_results`` of the best candidates (cheap:
a partition, then a sort of the few); only if too few of those survive do they run on all."""


def arranged_positions(
    sku_ids: Int64Array,
    restaurant_ids: Int64Array,
    scores: Float32Array,
    *,
    num_results: int,
    max_per_restaurant: int,
    exclude: Int64Array | None = None,
) -> Int64Array:
    """Positions (into the inputs) of the best-first top-``num_results``: no duplicate SKU, no
    excluded SKU, at most ``max_per_restaurant`` items per restaurant. Ties break on the lower
    SKU id.

    Each rule decides an item from the items before it in that order only, so the rules over
    a prefix of the order keep exactly the prefix of what they keep over all of it: the best
    ``PREFIX_FACTOR * num_results`` (every item tied with the last of them included) are tried
    first, and all candidates only when fewer than ``num_results`` of those survive.
    """
    negated = -scores.astype(np.float64)
    size = PREFIX_FACTOR * num_results
    if size < negated.shape[0]:
        bound = np.partition(negated, size - 1)[size - 1]
        if not np.isnan(bound):
            prefix = np.flatnonzero(negated <= bound)  # every item ordered before the bound's
            at = _arranged(
                sku_ids[prefix], restaurant_ids[prefix], negated[prefix],
                num_results=num_results, max_per_restaurant=max_per_restaurant, exclude=exclude,
            )  # fmt: skip
            if at.shape[0] >= num_results:
                return prefix[at]
    return _arranged(
        sku_ids, restaurant_ids, negated,
        num_results=num_results, max_per_restaurant=max_per_restaurant, exclude=exclude,
    )  # fmt: skip


def _arranged(
    sku_ids: Int64Array,
    restaurant_ids: Int64Array,
    negated_scores: npt.NDArray[np.float64],
    *,
    num_results: int,
    max_per_restaurant: int,
    exclude: Int64Array | None,
) -> Int64Array:
    """:func:`arranged_positions` over all of the given candidates."""
    order = np.lexsort((sku_ids, negated_scores))
    sku, rest = sku_ids[order], restaurant_ids[order]
    keep = np.ones(sku.shape[0], dtype=np.bool_)
    if exclude is not None and exclude.size:
        keep &= ~np.isin(sku, exclude)
    _, first = np.unique(sku, return_index=True)
    unique = np.zeros_like(keep)
    unique[first] = True  # np.unique keeps the first occurrence, i.e. the best-scored copy
    keep &= unique
    order, rest = order[keep], rest[keep]
    keep = rank_within_group(rest) < max_per_restaurant
    return order[keep][:num_results].astype(np.int64, copy=False)


def _best_first(request: Int64Array, sku_ids: Int64Array, scores: Float32Array) -> Int64Array:
    """The rows ordered by request, then best score first, ties on the lower SKU id, then the
    earlier row (NaN scores last, -0.0 equal to 0.0): one stable sort of a packed key when the
    request, the score's 32 bits and the SKU id fit in 63 bits, else a three-key lexsort."""
    requests = int(request[-1]) + 1 if request.size else 1
    sku_bits = max(int(sku_ids.max(initial=0)).bit_length(), 1)
    request_bits = max((requests - 1).bit_length(), 1)
    if request_bits + 32 + sku_bits > 63:
        return np.lexsort((sku_ids, -scores.astype(np.float64), request))
    negated = -scores.astype(np.float32) + np.float32(0.0)  # -0.0 + 0.0 is 0.0: they tie
    bits = negated.view(np.uint32).astype(np.int64)
    # IEEE floats order as integers once negative ones have every bit flipped and positive
    # ones their sign bit set; NaN goes after +inf, as in numpy's sorts.
    bits = np.where(bits >= 1 << 31, bits ^ 0xFFFFFFFF, bits | (1 << 31))
    bits[np.isnan(negated)] = 0xFFFFFFFF
    key = (request << (32 + sku_bits)) | (bits << sku_bits) | sku_ids
    return np.argsort(key, kind="stable")


def _kept(
    sku_ids: Int64Array,
    restaurant_ids: Int64Array,
    request: Int64Array,
    caps: Int64Array,
    excluded: tuple[Int64Array, Int64Array],
) -> npt.NDArray[np.bool_]:
    """Which rows the rules keep, for rows in best-first order grouped by request: the first
    copy of each (request, SKU), no SKU its request excludes (``excluded``: requests and SKU
    ids), at most ``caps[request]`` per (request, restaurant).

    The rules of :func:`_arranged`, keyed by request too. The one-request path keeps its own
    copy, without the request keys' extra numpy calls on batches of one or two; the property
    test in tests/pipeline/test_arrange.py holds the two to the same positions."""
    span = int(sku_ids.max(initial=0)) + 1
    key = request * span + sku_ids
    keep = np.zeros(key.shape[0], dtype=np.bool_)
    keep[np.unique(key, return_index=True)[1]] = True  # the first copy: the best-scored
    owner, sku = excluded
    inside = (sku >= 0) & (sku < span)  # a SKU no row holds excludes nothing
    if inside.any():
        keep &= ~np.isin(key, owner[inside] * span + sku[inside])
    at = np.flatnonzero(keep)
    groups = request[at] * (int(restaurant_ids.max(initial=0)) + 1) + restaurant_ids[at]
    keep[at[rank_within_group(groups) >= caps[request[at]]]] = False
    return keep


def arranged_positions_batch(
    sku_ids: Int64Array,
    restaurant_ids: Int64Array,
    scores: Float32Array,
    counts: Int64Array,
    *,
    num_results: Int64Array,
    max_per_restaurant: Int64Array,
    exclude: tuple[Int64Array, ...],
) -> list[Int64Array]:
    """:func:`arranged_positions` of every request of a batch, in one pass over the batch.

    The inputs are the requests' candidates concatenated (``counts`` rows each, SKU ids >= 0);
    ``num_results``, ``max_per_restaurant`` and ``exclude`` hold one entry per request. Each
    returned array holds positions into its own request's candidates, exactly as
    :func:`arranged_positions` gives them. The best ``PREFIX_FACTOR * num_results`` rows of
    every request are arranged first, and all rows of the requests those leave short.
    """
    sizes = np.asarray(counts, dtype=np.int64)
    b = sizes.shape[0]
    wanted = np.asarray(num_results, dtype=np.int64)
    caps = np.asarray(max_per_restaurant, dtype=np.int64)
    request = np.repeat(np.arange(b, dtype=np.int64), sizes)
    # Sorted rows stay grouped by request in request order, so row n of ``order`` belongs to
    # ``request[n]`` too.
    order = _best_first(request, sku_ids, scores)
    excluded = (
        np.repeat(np.arange(b, dtype=np.int64), [e.size for e in exclude]),
        np.concatenate([np.zeros(0, np.int64), *exclude]).astype(np.int64),
    )
    limit = PREFIX_FACTOR * wanted
    chosen = positions_in_segments(sizes) < np.repeat(limit, sizes)
    rows, owner = order[chosen], request[chosen]
    keep = _kept(sku_ids[rows], restaurant_ids[rows], owner, caps, excluded)
    short = (np.bincount(owner[keep], minlength=b) < wanted) & (sizes > limit)
    if short.any():  # the best few were not enough: all of those requests' rows
        chosen |= np.repeat(short, sizes)
        rows, owner = order[chosen], request[chosen]
        keep = _kept(sku_ids[rows], restaurant_ids[rows], owner, caps, excluded)
    rows, owner = rows[keep], owner[keep]
    kept = np.bincount(owner, minlength=b)
    first = positions_in_segments(kept) < np.repeat(wanted, kept)
    rows, owner = rows[first], owner[first]
    local = rows - (np.cumsum(sizes) - sizes)[owner]
    return np.split(local, np.cumsum(np.minimum(kept, wanted))[:-1])


def arrange(
    sku_ids: Int64Array,
    restaurant_ids: Int64Array,
    scores: Float32Array,
    *,
    num_results: int,
    max_per_restaurant: int,
    exclude: Int64Array | None = None,
) -> ScoredItems:
    """The items at :func:`arranged_positions`, best first."""
    at = arranged_positions(
        sku_ids,
        restaurant_ids,
        scores,
        num_results=num_results,
        max_per_restaurant=max_per_restaurant,
        exclude=exclude,
    )
    return ScoredItems(
        sku_ids=sku_ids[at], restaurant_ids=restaurant_ids[at], scores=scores[at].astype(np.float32)
    )


ONE_BY_ONE_UP_TO = 2
"""Batches of up to this many requests are arranged request by request. On the 4M world the
batch's one pass cost 1.9x as much as one pass per request at one request a batch, 0.95x at
two, 0.93x at four and 0.42-0.48x at 16-32 (``bench_stages --arrange-paths``)."""


class ArrangeSnapshot(Protocol):
    """The part of the serving snapshot the arrange stage reads."""

    @property
    def catalogue(self) -> Catalogue: ...


class Arrange:
    """The feed's rules over each request's scored candidates; sets ``items`` and
    ``served_positions``.

    A batch of up to ``one_by_one_up_to`` requests arranges each with
    :func:`arranged_positions` (a partition finds a request's best few without sorting all its
    candidates); a larger one takes :func:`arranged_positions_batch`, whose one sort over the
    batch costs less than a sort per request (``benchmarks/bench_stages.py``)."""

    name = "arrange"

    def __init__(self, one_by_one_up_to: int = ONE_BY_ONE_UP_TO) -> None:
        self.one_by_one_up_to = one_by_one_up_to

    def run(self, batch: Batch, snapshot: ArrangeSnapshot) -> Batch:
        if batch.scores is None:
            raise ValueError("arrange: the batch has no scores (the rank stage runs first)")
        scores = batch.scores
        counts = batch.candidate_counts
        sku_ids = (
            np.concatenate([c.sku_ids for c in batch.candidates])
            if batch.candidates
            else np.zeros(0, np.int64)
        ).astype(np.int64, copy=False)
        restaurant_ids = snapshot.catalogue.item_restaurant[sku_ids].astype(np.int64)
        exclude = tuple(np.asarray(r.exclude_sku_ids, dtype=np.int64) for r in batch.requests)
        starts = (np.cumsum(counts) - counts).tolist()
        if len(batch) <= self.one_by_one_up_to:
            local = [
                arranged_positions(
                    sku_ids[start : start + count],
                    restaurant_ids[start : start + count],
                    scores[start : start + count],
                    num_results=request.num_results,
                    max_per_restaurant=assignment.params.max_per_restaurant,
                    exclude=excluded,
                )
                for start, count, request, assignment, excluded in zip(
                    starts, counts.tolist(), batch.requests, batch.assignments, exclude, strict=True
                )
            ]
        else:
            local = arranged_positions_batch(
                sku_ids,
                restaurant_ids,
                scores,
                counts,
                num_results=np.array([r.num_results for r in batch.requests], dtype=np.int64),
                max_per_restaurant=np.array(
                    [a.params.max_per_restaurant for a in batch.assignments], dtype=np.int64
                ),
                exclude=exclude,
            )
        items = []
        for start, at in zip(starts, local, strict=True):  # one per request
            rows = at + start
            items.append(
                ScoredItems(
                    sku_ids=sku_ids[rows],
                    restaurant_ids=restaurant_ids[rows],
                    scores=scores[rows].astype(np.float32),
                )
            )
        return replace(batch, items=tuple(items), served_positions=tuple(local))
