"""The capture stage: what the exposure record needs that the other stages do not keep.

For every request, the user's feature row as the ranker used it (the online store's row when
one served it, else the local tables' row), so a replay does not depend on the live feature
store. For a sampled share of requests (deterministic by a hash of the request id, set per
deployment), every ranked candidate with its final score, so a challenger can be judged on the
items the user did not see. It only reads the batch: it never changes what is served.
"""

from __future__ import annotations

import zlib
from dataclasses import replace
from typing import Protocol

import numpy as np

from recsys.ranking.features import FeatureTables, user_feature_rows
from recsys.stage import Batch
from recsys.types import ScoredItems
from recsys.world import Catalogue


def sampled(request_id: str, share: float) -> bool:
    """Whether ``request_id`` falls in the sampled ``share`` (0..1); the same id always does."""
    if share <= 0.0:
        return False
    if share >= 1.0:
        return True
    return zlib.crc32(request_id.encode()) < share * 2**32


class CaptureSnapshot(Protocol):
    """The part of the serving snapshot the capture stage reads."""

    @property
    def tables(self) -> FeatureTables: ...

    @property
    def catalogue(self) -> Catalogue: ...


class Capture:
    """Needs ``scores``; sets ``served_features`` and ``logged_candidates``."""

    name = "capture"

    def __init__(self, candidate_share: float = 0.0) -> None:
        if not 0.0 <= candidate_share <= 1.0:
            raise ValueError(f"candidate_share: expected 0..1, got {candidate_share}")
        self.candidate_share = candidate_share

    def run(self, batch: Batch, snapshot: CaptureSnapshot) -> Batch:
        rows = batch.user_features
        if rows is None:
            rows = user_feature_rows(snapshot.tables, np.maximum(batch.user_rows, 0))
        logged: list[ScoredItems | None] = [None] * len(batch)
        share = self.candidate_share
        if share > 0.0 and batch.scores is not None:
            offsets = np.concatenate([[0], np.cumsum(batch.candidate_counts)])
            restaurants = snapshot.catalogue.item_restaurant
            for n, request in enumerate(batch.requests):  # one per request, not per candidate
                if sampled(request.request_id, share):
                    sku_ids = batch.candidates[n].sku_ids
                    logged[n] = ScoredItems(
                        sku_ids=sku_ids,
                        restaurant_ids=restaurants[sku_ids].astype(np.int64),
                        scores=batch.scores[offsets[n] : offsets[n + 1]],
                    )
        return replace(batch, served_features=rows, logged_candidates=tuple(logged))
