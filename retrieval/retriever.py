"""The retrieve stage: candidates for a batch of requests from one FAISS search.

Known users get their nearest items by inner product, with unavailable items filtered inside the
search and items beyond the delivery radius or excluded by the request dropped afterwards.
Whenever fewer than ``k`` survive, the most popular eligible items top the list up, so a tight
radius or a heavy availability filter never starves the ranker. Unknown users (and users without
a learned vector) get popular eligible items near their location, flagged ``fallback``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from recsys.geo import haversine_km
from recsys.types import BoolArray, Candidates, Float32Array, Int64Array, Location
from recsys.world import Catalogue
from retrieval.availability import Availability
from retrieval.index import ItemIndex

RADIUS_OVERFETCH = 4
"""With a delivery radius, search this many times the candidates wanted: the radius drops some."""
TOPUP_FIRST_SCAN = 1024
TOPUP_SCAN_GROWTH = 4
"""The popular-item top-up scans a growing prefix of the popularity order until it has enough."""

_NO_IDS: Int64Array = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class RetrievalQuery:
    user_row: int
    """Row in the user vectors; -1 for an unknown user."""
    location: Location | None
    k: int
    """Candidates wanted."""
    nprobe: int
    radius_km: float
    exclude: tuple[int, ...] = ()


class _DeliveryRadius:
    """Which items' restaurants lie within ``radius_km`` of one location.

    Small id sets are checked item by item; once a set outnumbers the restaurants, one distance
    per restaurant is cheaper, so the per-restaurant mask is computed (once) and gathered.
    """

    def __init__(self, catalogue: Catalogue, location: Location, radius_km: float) -> None:
        self._catalogue = catalogue
        self._location = location
        self._radius_km = radius_km
        self._near_restaurants: BoolArray | None = None

    def within(self, ids: Int64Array) -> BoolArray:
        c = self._catalogue
        restaurants = c.item_restaurant[ids]
        if ids.size > c.n_restaurants:
            if self._near_restaurants is None:
                self._near_restaurants = self._near(c.restaurant_lat, c.restaurant_lon)
            return self._near_restaurants[restaurants]
        return self._near(c.restaurant_lat[restaurants], c.restaurant_lon[restaurants])

    def _near(self, lat: npt.NDArray[np.float64], lon: npt.NDArray[np.float64]) -> BoolArray:
        loc = self._location
        return haversine_km(loc.lat, loc.lon, lat, lon) <= self._radius_km


class Retriever:
    """Batched candidate retrieval over one index version and one availability snapshot."""

    def __init__(
        self,
        index: ItemIndex,
        user_vectors: Float32Array,
        catalogue: Catalogue,
        item_popularity: Float32Array,
        availability: Availability,
    ) -> None:
        users = np.ascontiguousarray(user_vectors, dtype=np.float32)
        popularity = np.asarray(item_popularity, dtype=np.float32)
        if users.ndim != 2 or users.shape[1] != index.dimension:
            raise ValueError(
                f"user_vectors: expected shape [users, {index.dimension}], got {users.shape}"
            )
        for name, size in (
            ("catalogue items", catalogue.n_items),
            ("item_popularity", popularity.shape[0] if popularity.ndim == 1 else -1),
            ("availability.item_mask", availability.item_mask.shape[0]),
        ):
            if size != index.count:
                raise ValueError(f"{name}: expected {index.count} items (the index), got {size}")
        self._index = index
        self._user_vectors = users
        self._has_vector: BoolArray = np.any(users != 0, axis=1)
        self._catalogue = catalogue
        self._popularity = popularity
        # The popularity order is computed once; each availability snapshot filters it once.
        self._popular_order: Int64Array = np.argsort(-popularity, kind="stable").astype(np.int64)
        self._set_availability(availability)

    def _set_availability(self, availability: Availability) -> None:
        self.availability = availability
        order = self._popular_order
        self._popular_available: Int64Array = order[availability.item_mask[order]]

    def with_availability(self, availability: Availability) -> Retriever:
        """A retriever for a new availability snapshot, sharing everything else."""
        if availability.item_mask.shape[0] != self._index.count:
            raise ValueError(
                f"availability.item_mask: expected {self._index.count} items, "
                f"got {availability.item_mask.shape[0]}"
            )
        clone = copy.copy(self)
        clone._set_availability(availability)
        return clone

    def retrieve_batch(self, queries: Sequence[RetrievalQuery]) -> list[Candidates]:
        """Candidates for every query, in order: one FAISS search per distinct ``nprobe``.

        A batch normally shares one ``nprobe``; when experiment arms differ, each keeps its own
        rather than the batch silently searching with another arm's setting. Each query uses
        only its own share of the search, so a batch answers exactly as the queries one by one.
        """
        for q in queries:
            self._check(q)
        out: list[Candidates | None] = [None] * len(queries)
        by_nprobe: dict[int, list[int]] = {}
        for i, q in enumerate(queries):
            if self._is_known(q):
                by_nprobe.setdefault(q.nprobe, []).append(i)
            else:
                out[i] = self._popular_fallback(q)
        for nprobe, positions in by_nprobe.items():
            fetch = [self._fetch(queries[i]) for i in positions]
            rows = np.array([queries[i].user_row for i in positions], dtype=np.int64)
            scores, ids = self._index.search(
                self._user_vectors[rows],
                max(fetch),
                nprobe=nprobe,
                allowed=self.availability.selector,
            )
            for n, i in enumerate(positions):
                out[i] = self._personal(queries[i], ids[n, : fetch[n]], scores[n, : fetch[n]])
        return [c for c in out if c is not None]

    def _check(self, q: RetrievalQuery) -> None:
        if not -1 <= q.user_row < self._user_vectors.shape[0]:
            raise ValueError(
                f"user_row: expected -1 (unknown) or 0..{self._user_vectors.shape[0] - 1}, "
                f"got {q.user_row}"
            )
        if q.k < 1:
            raise ValueError(f"k: expected >= 1 candidates, got {q.k}")
        if q.nprobe < 1:
            raise ValueError(f"nprobe: expected >= 1, got {q.nprobe}")
        if q.location is not None and not (math.isfinite(q.radius_km) and q.radius_km > 0):
            raise ValueError(f"radius_km: expected a positive distance, got {q.radius_km}")

    def _is_known(self, q: RetrievalQuery) -> bool:
        return q.user_row >= 0 and bool(self._has_vector[q.user_row])

    def _fetch(self, q: RetrievalQuery) -> int:
        """How many search results a query needs so its filters still leave ``k``."""
        wanted = q.k + len(q.exclude)  # each exclusion removes at most one result
        if q.location is not None:
            wanted *= RADIUS_OVERFETCH
        return min(wanted, self._index.count)

    def _radius(self, q: RetrievalQuery) -> _DeliveryRadius | None:
        if q.location is None:
            return None
        return _DeliveryRadius(self._catalogue, q.location, q.radius_km)

    def _personal(self, q: RetrievalQuery, ids: Int64Array, scores: Float32Array) -> Candidates:
        exclude = np.asarray(q.exclude, dtype=np.int64)
        radius = self._radius(q)
        keep = ids >= 0
        if exclude.size:
            keep &= ~np.isin(ids, exclude)
        if radius is not None:
            keep[keep] = radius.within(ids[keep])
        ids, scores = ids[keep][: q.k], scores[keep][: q.k]
        if ids.size < q.k:
            extra = self._popular_eligible(q.k - ids.size, radius, exclude, ids)
            if extra.size:
                user = self._user_vectors[q.user_row]
                ids = np.concatenate([ids, extra])
                scores = np.concatenate([scores, self._index.reconstruct(extra) @ user])
                order = np.argsort(-scores, kind="stable")
                ids, scores = ids[order], scores[order]
        return Candidates(sku_ids=ids, retrieval_scores=scores.astype(np.float32, copy=False))

    def _popular_fallback(self, q: RetrievalQuery) -> Candidates:
        exclude = np.asarray(q.exclude, dtype=np.int64)
        ids = self._popular_eligible(q.k, self._radius(q), exclude, _NO_IDS)
        return Candidates(sku_ids=ids, retrieval_scores=self._popularity[ids], fallback=True)

    def _popular_eligible(
        self,
        need: int,
        radius: _DeliveryRadius | None,
        exclude: Int64Array,
        present: Int64Array,
    ) -> Int64Array:
        """The ``need`` most popular available items within the radius, not excluded or present.

        Scans a prefix of the popularity order that grows geometrically, so the usual case reads
        a few thousand items and the worst case (almost nothing eligible) reads all of them once.
        """
        order = self._popular_available
        found: list[Int64Array] = []
        n_found = 0
        start, size = 0, max(TOPUP_FIRST_SCAN, 4 * need)
        while n_found < need and start < order.size:
            ids = order[start : start + size]
            keep = np.ones(ids.size, dtype=np.bool_)
            if exclude.size:
                keep &= ~np.isin(ids, exclude)
            if present.size:
                keep &= ~np.isin(ids, present)
            if radius is not None:
                keep[keep] = radius.within(ids[keep])
            got = ids[keep][: need - n_found]
            found.append(got)
            n_found += got.size
            start += size
            size *= TOPUP_SCAN_GROWTH
        return np.concatenate(found) if found else _NO_IDS
