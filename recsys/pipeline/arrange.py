"""The arrange stage: the feed's business rules over scored candidates, then top-N.

Vectorised per request, no per-item loop.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

import numpy as np
import numpy.typing as npt

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


class ArrangeSnapshot(Protocol):
    """The part of the serving snapshot the arrange stage reads."""

    @property
    def catalogue(self) -> Catalogue: ...


class Arrange:
    """The feed's rules over each request's scored candidates; sets ``items`` and
    ``served_positions``."""

    name = "arrange"

    def run(self, batch: Batch, snapshot: ArrangeSnapshot) -> Batch:
        if batch.scores is None:
            raise ValueError("arrange: the batch has no scores (the rank stage runs first)")
        counts = batch.candidate_counts
        offsets = np.concatenate([[0], np.cumsum(counts)])
        restaurants = snapshot.catalogue.item_restaurant
        items = []
        positions = []
        for n, (request, assignment, candidates) in enumerate(  # one per request
            zip(batch.requests, batch.assignments, batch.candidates, strict=True)
        ):
            sku_ids = candidates.sku_ids
            restaurant_ids = restaurants[sku_ids].astype(np.int64)
            scores = batch.scores[offsets[n] : offsets[n + 1]]
            at = arranged_positions(
                sku_ids,
                restaurant_ids,
                scores,
                num_results=request.num_results,
                max_per_restaurant=assignment.params.max_per_restaurant,
                exclude=np.asarray(request.exclude_sku_ids, dtype=np.int64),
            )
            items.append(
                ScoredItems(
                    sku_ids=sku_ids[at],
                    restaurant_ids=restaurant_ids[at],
                    scores=scores[at].astype(np.float32),
                )
            )
            positions.append(at)
        return replace(batch, items=tuple(items), served_positions=tuple(positions))
