"""The retrieve stage: candidates for a batch of requests from one FAISS search per delivery cell.

Known users get their nearest items by inner product. Unavailable items and items of restaurants
far from the request's ~2 km delivery cell are filtered inside the search (one FAISS selector
per cell, radius and availability snapshot, cached); the exact radius (checked once over the
whole batch's results) and the request's exclusions are applied to the results afterwards.
Whenever fewer than ``k`` survive, the most popular eligible items top the list up, so a tight
radius or a heavy availability filter never starves the ranker. Unknown users (and users without
a learned vector) get popular eligible items near their location, flagged ``fallback``.
"""

from __future__ import annotations

import copy
import functools
import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt

from recsys.geo import (
    BOUNDARY_TOLERANCE,
    EARTH_RADIUS_KM,
    half_chord_squared_limit,
    haversine_km,
    unit_vectors,
)
from recsys.retrieval.availability import Availability, AvailabilitySelector
from recsys.retrieval.index import ItemIndex
from recsys.types import BoolArray, Candidates, Float32Array, Int64Array, Location
from recsys.world import Catalogue

RADIUS_OVERFETCH = 8
"""With a delivery radius filtered after the search (``radius_in_search=False``), search this
many times the candidates wanted: the radius drops some."""
CELL_DEG = 0.03
"""Side of a delivery cell in degrees of latitude and longitude (~3.3 km x 2.1 km at 52 N).
Requests in one cell with one radius share a selector: the items of the restaurants within the
radius plus the cell's half-diagonal of its centre, which holds every item deliverable to any
point of the cell."""
CELL_SELECTORS = 256
"""Cells whose nearby items are kept (least recently used dropped; shared by every
availability snapshot of a catalogue): one bit per item each, 0.5 MB at 4M items. A 30 km
metro holds about 150 cells (188 hold the 4M world's 10,000 homes); building one costs ~17 ms
of CPU there. Each cell's selector for the current availability is kept as well (another
0.5 MB a cell at 4M: :class:`CellSelectors`)."""
CELL_FETCH_MARGIN = 1.15
"""Search this many times the candidates wanted beyond the share of the cell's items the exact
radius is expected to drop (the area ratio of the two circles)."""
MAX_REFETCH = 3
"""Deeper searches (4x each) for a query whose full result still left too few in its radius."""
TOPUP_FIRST_SCAN = 1024
TOPUP_SCAN_GROWTH = 4
TOPUP_SCAN_LIMIT = 4_096
"""The popular top-up scans a growing prefix of the popularity order; past this many items with
few eligible ones found, it reads the items of the restaurants near the location instead."""

GRID_ROW_DEG = 0.1
"""Height of a latitude row of the restaurant grid (~11 km)."""
MAX_GRID_ROWS = 64
"""A radius spanning more rows than this measures every restaurant instead."""

_NO_IDS: Int64Array = np.zeros(0, dtype=np.int64)
Int32Array = npt.NDArray[np.int32]


def _sorted_exclusions(q: RetrievalQuery) -> Int64Array:
    """The query's excluded ids, sorted and unique (most queries exclude nothing)."""
    if not q.exclude:
        return _NO_IDS
    return np.unique(np.asarray(q.exclude, dtype=np.int64))


def _isin_sorted(ids: npt.NDArray[np.integer], sorted_ids: Int64Array) -> BoolArray:
    """``np.isin(ids, sorted_ids)`` for a small sorted set: a binary search, no hashing."""
    if sorted_ids.size == 0:
        return np.zeros(ids.shape, dtype=np.bool_)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), sorted_ids.size - 1)
    return np.asarray(sorted_ids[pos] == ids)


@dataclass(frozen=True)
class RetrievalQuery:
    """One request's retrieval: who, where, how many, how hard to search, what to leave out."""

    user_row: int
    """Row in the user vectors; -1 for an unknown user. A row whose vector is all zeros (no
    history) is served like an unknown user."""
    location: Location | None
    k: int
    """Candidates wanted."""
    nprobe: int
    """IVF lists to search; 0 = the index version's default for this ``k``
    (:meth:`~recsys.retrieval.index.ItemIndex.nprobe_for`: the nprobe its recall under the
    delivery filter was measured to reach the target at, for this depth, when published)."""
    radius_km: float
    exclude: tuple[int, ...] = ()


class CatalogueGeo:
    """Where the catalogue's items are: built once per catalogue, shared by every snapshot.

    Restaurants sit in a grid of latitude rows (:data:`GRID_ROW_DEG` high), sorted by longitude
    within a row, so "restaurants within r km" measures only those in the bounding box of the
    circle, not every restaurant in the country. Items are grouped by restaurant, most popular
    first, to list the items of the restaurants found.
    """

    def __init__(self, catalogue: Catalogue, popularity_rank: Int32Array) -> None:
        self.catalogue = catalogue
        lat = np.asarray(catalogue.restaurant_lat, dtype=np.float64)
        lon = np.asarray(catalogue.restaurant_lon, dtype=np.float64)
        row = np.floor(lat / GRID_ROW_DEG).astype(np.int64)
        self._by_row: Int64Array = np.lexsort((lon, row)).astype(np.int64)
        self._rows: Int64Array = row[self._by_row]
        self._lons = lon[self._by_row]
        restaurant = catalogue.item_restaurant
        self._items: Int32Array = np.lexsort((popularity_rank, restaurant)).astype(np.int32)
        counts = np.bincount(restaurant, minlength=catalogue.n_restaurants)
        self._offsets: Int64Array = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._unit = unit_vectors(lat, lon)  # [R, 3]: 24 bytes a restaurant

    def within(
        self,
        lat: float | npt.NDArray[np.float64],
        lon: float | npt.NDArray[np.float64],
        radius_km: float | npt.NDArray[np.float64],
        ids: npt.NDArray[np.integer],
    ) -> BoolArray:
        """Whether each item's restaurant is within ``radius_km`` of its place: scalars with
        ``ids`` [F], or one place per row with ``lat``, ``lon``, ``radius_km`` [B] and ``ids``
        [B, F] (a whole batch in one call).

        Decides exactly as ``haversine_km(...) <= radius_km`` does, without its trigonometry per
        item: a dot product of unit vectors against the radius's bound, and haversine itself
        only for the rare item within :data:`~recsys.geo.BOUNDARY_TOLERANCE` of the bound.
        """
        c = self.catalogue
        # np.take, not fancy indexing: 2-3x faster for these gathers (rows of a 2-D table).
        restaurants = np.take(c.item_restaurant, ids)
        centre = unit_vectors(lat, lon)  # [3] or [B, 3]
        points = np.take(self._unit, restaurants, axis=0)
        cos_angle = np.matmul(points, centre[..., None])[..., 0]
        half_chord_sq = 0.5 * (1.0 - cos_angle)
        limit = half_chord_squared_limit(radius_km)
        if limit.ndim:
            limit = limit[:, None]
        near = half_chord_sq <= limit
        unsure = np.abs(half_chord_sq - limit) <= BOUNDARY_TOLERANCE
        if unsure.any():
            at = restaurants[unsure]
            place_lat, place_lon, radius = (
                np.broadcast_to(np.asarray(v, dtype=np.float64)[..., None], ids.shape)[unsure]
                if np.ndim(v)
                else v
                for v in (lat, lon, radius_km)
            )
            km = haversine_km(place_lat, place_lon, c.restaurant_lat[at], c.restaurant_lon[at])
            near[unsure] = km <= radius
        return np.asarray(near)

    def restaurants_near(self, location: Location, radius_km: float) -> Int64Array:
        """Restaurants within ``radius_km`` of ``location`` (exact: haversine on the box)."""
        c = self.catalogue
        angle = radius_km / EARTH_RADIUS_KM  # radians of arc
        dlat = math.degrees(angle) * (1 + 1e-9) + 1e-9
        first = math.floor((location.lat - dlat) / GRID_ROW_DEG)
        last = math.floor((location.lat + dlat) / GRID_ROW_DEG)
        if last - first >= MAX_GRID_ROWS:
            candidates = np.arange(c.n_restaurants, dtype=np.int64)
        else:
            # Half-width in longitude of a circle of that radius (none near a pole or past the
            # antimeridian: the whole row is read there).
            dlon: float | None = None
            if abs(location.lat) + math.degrees(angle) < 89.0:
                ratio = math.sin(angle) / math.cos(math.radians(location.lat))
                dlon = math.degrees(math.asin(min(1.0, ratio))) * (1 + 1e-9) + 1e-9
                if abs(location.lon) + dlon >= 180.0:
                    dlon = None
            spans = []
            for row in range(first, last + 1):  # a few rows: 2 r / 11 km + 1
                lo = int(np.searchsorted(self._rows, row, side="left"))
                hi = int(np.searchsorted(self._rows, row, side="right"))
                if dlon is not None:
                    lons = self._lons[lo:hi]
                    lo, hi = (
                        lo + int(np.searchsorted(lons, location.lon - dlon, side="left")),
                        lo + int(np.searchsorted(lons, location.lon + dlon, side="right")),
                    )
                spans.append(self._by_row[lo:hi])
            candidates = np.concatenate(spans)
        km = haversine_km(
            location.lat, location.lon, c.restaurant_lat[candidates], c.restaurant_lon[candidates]
        )
        return candidates[km <= radius_km]

    def items_near(self, location: Location, radius_km: float) -> Int32Array:
        """Items of every restaurant within ``radius_km`` of ``location``."""
        near = self.restaurants_near(location, radius_km)
        starts = self._offsets[near]
        lengths = self._offsets[near + 1] - starts
        total = int(lengths.sum())
        # Concatenate the item ranges of the near restaurants without a loop over them.
        positions = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(total)
        return self._items[positions]


def cell_of(location: Location) -> tuple[int, int]:
    """The delivery cell holding ``location``."""
    return math.floor(location.lat / CELL_DEG), math.floor(location.lon / CELL_DEG)


@functools.lru_cache(maxsize=4096)
def cell_reach_km(cell: tuple[int, int], radius_km: float) -> tuple[Location, float]:
    """The centre of ``cell`` and the distance from it that covers ``radius_km`` around every
    point of the cell: the radius plus the farthest corner (with a margin for rounding).
    Kept per cell and radius: every query of a cell asks for it."""
    lat0, lon0 = cell[0] * CELL_DEG, cell[1] * CELL_DEG
    centre = Location(lat0 + CELL_DEG / 2, lon0 + CELL_DEG / 2)
    corners = haversine_km(
        centre.lat,
        centre.lon,
        np.array([lat0, lat0, lat0 + CELL_DEG, lat0 + CELL_DEG]),
        np.array([lon0, lon0 + CELL_DEG, lon0, lon0 + CELL_DEG]),
    )
    return centre, radius_km + float(corners.max()) * 1.01 + 1e-6


K = TypeVar("K")
V = TypeVar("V")


class _Lru(Generic[K, V]):
    """A thread-safe map of at most ``size`` entries, the least recently used dropped first."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class CellSelectors:
    """FAISS selectors per (delivery cell, radius): the available items near the cell.

    What is near a cell depends only on the catalogue, so it is built once per cell (~17 ms at
    4M items), packed one bit per item, and kept in an LRU shared by every availability
    snapshot; a selector is that bitmap AND the snapshot's availability bitmap (a byte-wise AND
    over N / 8 bytes: ~0.05-0.1 ms at 4M), so an availability change costs nothing here. The
    selector of each cell is kept too, for the availability it was made with (a weak
    reference: it is made again once that availability is replaced), so the requests of a cell
    share it until availability changes: another N / 8 bytes per cell.
    Thread-safe; two threads may build one cell at once.
    """

    def __init__(self, geo: CatalogueGeo, size: int = CELL_SELECTORS):
        self._geo = geo
        self._size = size
        self._near: _Lru[tuple[int, int, float], npt.NDArray[np.uint8]] = _Lru(size)
        self._selected: _Lru[
            tuple[int, int, float], tuple[weakref.ref[AvailabilitySelector], AvailabilitySelector]
        ] = _Lru(size)

    def near(self, cell: tuple[int, int], radius_km: float) -> npt.NDArray[np.uint8]:
        """The packed bitmap (FAISS's bit order) of the items near enough to ``cell``."""
        key = (*cell, radius_km)
        found = self._near.get(key)
        if found is not None:
            return found
        centre, reach = cell_reach_km(cell, radius_km)
        c = self._geo.catalogue
        near = np.zeros(c.n_restaurants, dtype=np.bool_)
        near[self._geo.restaurants_near(centre, reach)] = True
        bitmap = np.packbits(near[c.item_restaurant], bitorder="little")
        self._near.put(key, bitmap)
        return bitmap

    def get(
        self, cell: tuple[int, int], radius_km: float, availability: Availability
    ) -> AvailabilitySelector:
        """A selector of the items near ``cell`` that ``availability`` allows."""
        allowed = availability.selector
        key = (*cell, radius_km)
        found = self._selected.get(key)
        if found is not None and found[0]() is allowed:
            return found[1]
        bitmap = np.bitwise_and(self.near(cell, radius_km), allowed.bitmap)
        selector = AvailabilitySelector.from_bitmap(bitmap, allowed.size)
        self._selected.put(key, (weakref.ref(allowed), selector))
        return selector

    @property
    def size(self) -> int:
        """Cells kept at most."""
        return self._size

    def __len__(self) -> int:
        return len(self._near)


class _Search(NamedTuple):
    """One FAISS search of a batch: its queries (one nprobe, delivery cell and radius), at
    ``positions`` in the batch, each with its vector and how many results it needs, and the
    ``scores`` and ``ids`` found, [queries, max(fetch)]."""

    positions: list[int]
    queries: list[RetrievalQuery]
    vectors: Float32Array
    fetch: list[int]
    nprobe: int
    cell: tuple[int, int] | None
    selector: AvailabilitySelector
    scores: Float32Array
    ids: Int64Array


class Retriever:
    """Batched candidate retrieval over one index version and one availability snapshot."""

    def __init__(
        self,
        index: ItemIndex,
        user_vectors: Float32Array,
        catalogue: Catalogue,
        item_popularity: Float32Array,
        availability: Availability,
        *,
        radius_in_search: bool = True,
        cell_selectors: int = CELL_SELECTORS,
    ) -> None:
        """``user_vectors`` is the local copy: it says which users have a vector, and it is what
        a search reads when the batch brings no vectors of its own (an online store's).

        ``radius_in_search``: filter the delivery radius inside the search with a selector per
        delivery cell (the default), or, as before, search ``RADIUS_OVERFETCH`` times deeper and
        drop the far items afterwards. Both serve only eligible items."""
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
        self._popularity = popularity
        # Computed once per catalogue (int32 halves the memory at 4M items); each availability
        # snapshot then filters the popularity order once.
        self._popular_order: Int32Array = np.argsort(-popularity, kind="stable").astype(np.int32)
        self._popularity_rank: Int32Array = np.empty(index.count, dtype=np.int32)
        self._popularity_rank[self._popular_order] = np.arange(index.count, dtype=np.int32)
        self._geo = CatalogueGeo(catalogue, self._popularity_rank)
        self.radius_in_search = radius_in_search
        self.cells = CellSelectors(self._geo, cell_selectors)  # shared by availability clones
        self._set_availability(availability)

    def warm_cells(
        self, lat: npt.NDArray[np.float64], lon: npt.NDArray[np.float64], radius_km: float
    ) -> int:
        """Build the nearby-items bitmaps of the cells holding the most of these places (users'
        homes, at start-up), so their first requests do not pay for it; returns how many."""
        if not self.radius_in_search or lat.size == 0:
            return 0
        rows = np.floor(np.asarray(lat) / CELL_DEG).astype(np.int64)
        cols = np.floor(np.asarray(lon) / CELL_DEG).astype(np.int64)
        cells, counts = np.unique(np.stack([rows, cols], axis=1), axis=0, return_counts=True)
        busiest = cells[np.argsort(-counts, kind="stable")[: self.cells.size]]
        for row, col in busiest.tolist():  # one per cell: a few hundred at most
            self.cells.near((row, col), radius_km)
        return len(busiest)

    def _set_availability(self, availability: Availability) -> None:
        self.availability = availability
        order = self._popular_order
        self._popular_available: Int32Array = order[availability.item_mask[order]]

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

    def retrieve_batch(
        self, queries: Sequence[RetrievalQuery], vectors: Float32Array | None = None
    ) -> list[Candidates]:
        """Candidates for every query, in order: one FAISS search per distinct ``nprobe`` and,
        with the radius in the search, per delivery cell and radius; then one exact radius check
        over all the searches' results.

        ``vectors`` ([len(queries), dim], optional): the user vectors to search with, as an
        online feature store served them; by default each known user's local vector.

        A batch normally shares one ``nprobe``; when experiment arms differ, each keeps its own
        rather than the batch silently searching with another arm's setting. Each query uses
        only its own share of the search, so a batch answers exactly as the queries one by one.
        """
        for q in queries:
            self._check(q)
        out: list[Candidates | None] = [None] * len(queries)
        groups: dict[tuple[int, tuple[int, int] | None, float], list[int]] = {}
        for i, q in enumerate(queries):
            if self._is_known(q):
                nprobe = q.nprobe or self._index.nprobe_for(q.k)
                key: tuple[int, tuple[int, int] | None, float]
                if self.radius_in_search and q.location is not None:
                    key = (nprobe, cell_of(q.location), q.radius_km)
                else:
                    key = (nprobe, None, 0.0)
                groups.setdefault(key, []).append(i)
            else:
                out[i] = self._popular_fallback(q)
        searches: list[_Search] = []
        for (nprobe, cell, radius_km), positions in groups.items():
            group = [queries[i] for i in positions]
            if vectors is None:
                rows = np.array([q.user_row for q in group], dtype=np.int64)
                searched = self._user_vectors[rows]
            else:
                searched = np.ascontiguousarray(vectors[positions], dtype=np.float32)
            selector = (
                self.availability.selector
                if cell is None
                else self.cells.get(cell, radius_km, self.availability)
            )
            fetch = [self._fetch(q, cell) for q in group]
            scores, ids = self._index.search(searched, max(fetch), nprobe=nprobe, allowed=selector)
            searches.append(
                _Search(positions, group, searched, fetch, nprobe, cell, selector, scores, ids)
            )
        for search, usable in zip(searches, self._usable(searches), strict=True):
            for n, i in enumerate(search.positions):
                q, f = search.queries[n], search.fetch[n]
                found = search.scores[n, :f], search.ids[n, :f], usable[n, :f]
                if search.cell is not None:
                    found = self._refetch(
                        q, search.vectors[n], search.nprobe, search.selector, *found
                    )
                out[i] = self._personal(q, search.vectors[n], found[1], found[0], found[2])
        return [c for c in out if c is not None]

    def _usable(self, searches: Sequence[_Search]) -> list[BoolArray]:
        """For each search, [its queries, its deepest fetch] whether each result was returned
        and is within its query's radius: one exact radius check over the whole batch's results
        (each check is a dozen numpy calls; a batch at homes makes about one search a request)."""
        if len(searches) <= 1:
            return [(s.ids >= 0) & self._within_rows(s.queries, s.ids) for s in searches]
        width = max(s.ids.shape[1] for s in searches)
        ids = np.full((sum(len(s.queries) for s in searches), width), -1, dtype=np.int64)
        start = 0
        for s in searches:  # one copy a search
            ids[start : start + len(s.queries), : s.ids.shape[1]] = s.ids
            start += len(s.queries)
        usable = (ids >= 0) & self._within_rows([q for s in searches for q in s.queries], ids)
        out, start = [], 0
        for s in searches:
            out.append(usable[start : start + len(s.queries), : s.ids.shape[1]])
            start += len(s.queries)
        return out

    def _refetch(
        self,
        q: RetrievalQuery,
        user: Float32Array,
        nprobe: int,
        selector: AvailabilitySelector,
        scores: Float32Array,
        ids: Int64Array,
        usable: BoolArray,
    ) -> tuple[Float32Array, Int64Array, BoolArray]:
        """A deeper search for a query whose radius left fewer than ``k`` of a full result (the
        cell's selector holds more items than the radius): rare, and what keeps the in-search
        radius from losing recall to the popular top-up."""
        exclude = _sorted_exclusions(q)
        for _ in range(MAX_REFETCH):
            kept = usable & ~_isin_sorted(ids, exclude) if exclude.size else usable
            if int(np.count_nonzero(kept)) >= q.k or ids[-1] < 0 or ids.size >= self._index.count:
                break
            deeper = min(ids.size * 4, self._index.count)
            s, found = self._index.search(user[None, :], deeper, nprobe=nprobe, allowed=selector)
            scores, ids = s[0], found[0]
            usable = (ids >= 0) & self._within_rows([q], found)[0]
        return scores, ids, usable

    def _check(self, q: RetrievalQuery) -> None:
        if not -1 <= q.user_row < self._user_vectors.shape[0]:
            raise ValueError(
                f"user_row: expected -1 (unknown) or 0..{self._user_vectors.shape[0] - 1}, "
                f"got {q.user_row}"
            )
        if q.k < 1:
            raise ValueError(f"k: expected >= 1 candidates, got {q.k}")
        if q.nprobe < 0:
            raise ValueError(f"nprobe: expected >= 1, or 0 for the index default, got {q.nprobe}")
        if q.location is not None and not (math.isfinite(q.radius_km) and q.radius_km > 0):
            raise ValueError(f"radius_km: expected a positive distance, got {q.radius_km}")

    def _is_known(self, q: RetrievalQuery) -> bool:
        return q.user_row >= 0 and bool(self._has_vector[q.user_row])

    def _fetch(self, q: RetrievalQuery, cell: tuple[int, int] | None) -> int:
        """How many search results a query needs so its filters still leave ``k``: with the
        radius in the search, the share of its cell's items beyond the exact radius (the area
        ratio of the two circles) plus a margin; without, ``RADIUS_OVERFETCH`` times."""
        wanted = q.k + len(q.exclude)  # each exclusion removes at most one result
        if cell is not None:
            reach = cell_reach_km(cell, q.radius_km)[1]
            factor = min(RADIUS_OVERFETCH, CELL_FETCH_MARGIN * (reach / q.radius_km) ** 2)
            wanted = math.ceil(wanted * factor)
        elif q.location is not None:
            wanted *= RADIUS_OVERFETCH
        return min(wanted, self._index.count)

    def _within_rows(self, queries: Sequence[RetrievalQuery], ids: Int64Array) -> BoolArray:
        """[B, F] whether each search result is within its query's radius (True if no location),
        in one vectorised call for the whole batch."""
        located = np.array([q.location is not None for q in queries])
        if not located.any():
            return np.ones(ids.shape, dtype=np.bool_)
        lat = np.array([q.location.lat if q.location else 0.0 for q in queries])
        lon = np.array([q.location.lon if q.location else 0.0 for q in queries])
        radius = np.array([q.radius_km for q in queries])
        near = self._geo.within(lat, lon, radius, np.maximum(ids, 0))
        return np.asarray(near | ~located[:, None])

    def _personal(
        self,
        q: RetrievalQuery,
        user: Float32Array,
        ids: Int64Array,
        scores: Float32Array,
        usable: BoolArray,
    ) -> Candidates:
        """A known user's candidates from their share of the search (``usable``: returned and
        within the radius), topped up with popular eligible items if too few remain."""
        exclude = _sorted_exclusions(q)
        keep = usable.copy()
        if exclude.size:
            keep &= ~_isin_sorted(ids, exclude)
        ids, scores = ids[keep][: q.k], scores[keep][: q.k]
        if ids.size < q.k:
            extra = self._popular_eligible(q, q.k - ids.size, exclude, np.sort(ids))
            if extra.size:
                ids = np.concatenate([ids, extra])
                scores = np.concatenate([scores, self._index.reconstruct(extra) @ user])
                order = np.argsort(-scores, kind="stable")
                ids, scores = ids[order], scores[order]
        return Candidates(sku_ids=ids, retrieval_scores=scores.astype(np.float32, copy=False))

    def _popular_fallback(self, q: RetrievalQuery) -> Candidates:
        exclude = _sorted_exclusions(q)
        ids = self._popular_eligible(q, q.k, exclude, _NO_IDS)
        return Candidates(sku_ids=ids, retrieval_scores=self._popularity[ids], fallback=True)

    def _popular_eligible(
        self, q: RetrievalQuery, need: int, exclude: Int64Array, present: Int64Array
    ) -> Int64Array:
        """The ``need`` most popular available items near ``q``, not excluded or ``present``.

        ``exclude`` and ``present`` are sorted. The scan reads a geometrically growing prefix of
        the popularity order: a few thousand items in the usual case. With a location, if the
        first :data:`TOPUP_SCAN_LIMIT` items hold too few near ones, few items are near at all,
        so the rest comes from the items of the nearby restaurants (cheap exactly then).
        """
        order = self._popular_available
        limit = order.size if q.location is None else min(order.size, TOPUP_SCAN_LIMIT)
        found: list[npt.NDArray[np.integer]] = []
        n_found = 0
        start, size = 0, max(TOPUP_FIRST_SCAN, 4 * need)
        while n_found < need and start < limit:
            ids = order[start : min(start + size, limit)]
            keep = np.ones(ids.size, dtype=np.bool_)
            if exclude.size:
                keep &= ~_isin_sorted(ids, exclude)
            if present.size:
                keep &= ~_isin_sorted(ids, present)
            if q.location is not None:
                loc = q.location
                keep[keep] = self._geo.within(loc.lat, loc.lon, q.radius_km, ids[keep])
            got = ids[keep][: need - n_found]
            found.append(got)
            n_found += got.size
            start += ids.size
            size *= TOPUP_SCAN_GROWTH
        if n_found < need and q.location is not None and start < order.size:
            min_rank = int(self._popularity_rank[order[start]])
            found.append(
                self._popular_near(
                    q.location, q.radius_km, need - n_found, exclude, present, min_rank
                )
            )
        return np.concatenate(found).astype(np.int64) if found else _NO_IDS

    def _popular_near(
        self,
        location: Location,
        radius_km: float,
        need: int,
        exclude: Int64Array,
        present: Int64Array,
        min_rank: int,
    ) -> Int32Array:
        """The ``need`` most popular eligible items of the restaurants near ``location`` whose
        popularity rank is at least ``min_rank`` (the part of the order not yet scanned)."""
        ids = self._geo.items_near(location, radius_km)
        rank = self._popularity_rank[ids]
        keep = self.availability.item_mask[ids] & (rank >= min_rank)
        if exclude.size:
            keep &= ~_isin_sorted(ids, exclude)
        if present.size:
            keep &= ~_isin_sorted(ids, present)
        ids, rank = ids[keep], rank[keep]
        if ids.size > need:
            best = np.argpartition(rank, need - 1)[:need]
            ids, rank = ids[best], rank[best]
        return np.asarray(ids[np.argsort(rank)], dtype=np.int32)


def exact_top_eligible(
    retriever: Retriever,
    item_vectors: Float32Array,
    user_row: int,
    place: Location,
    *,
    k: int,
    radius_km: float,
) -> Int64Array:
    """The right answer under the filter: the exact top ``k`` by inner product among the items
    available in the retriever's snapshot and within ``radius_km`` of ``place`` (brute force
    over the eligible items, for measuring recall)."""
    eligible = retriever._geo.items_near(place, radius_km).astype(np.int64)
    eligible = eligible[retriever.availability.item_mask[eligible]]
    scores = (
        np.asarray(item_vectors, dtype=np.float32)[eligible] @ retriever._user_vectors[user_row]
    )
    return np.asarray(eligible[np.argsort(-scores, kind="stable")[:k]], dtype=np.int64)


def recall_under_filter(
    retriever: Retriever,
    item_vectors: Float32Array,
    users: Int64Array,
    places: Sequence[Location],
    *,
    k: int,
    radius_km: float,
    nprobes: Sequence[int],
) -> dict[int, float]:
    """recall@k of the retrieve stage at each of ``nprobes``, for ``users`` (rows with a vector)
    at ``places``: the share of the exact top ``k`` over the eligible items (available in the
    retriever's snapshot and within ``radius_km``) that the stage returns. This is the quality
    a request gets, filters included; recall without them says little about it, since the
    filter keeps a fraction of each list."""
    if len(places) != len(users):
        raise ValueError(f"places: expected one per user ({len(users)}), got {len(places)}")
    truth = [  # a few hundred probe users
        exact_top_eligible(retriever, item_vectors, row, place, k=k, radius_km=radius_km)
        for row, place in zip(users.tolist(), places, strict=True)
    ]
    out = {}
    for nprobe in nprobes:
        queries = [
            RetrievalQuery(user_row=row, location=place, k=k, nprobe=nprobe, radius_km=radius_km)
            for row, place in zip(users.tolist(), places, strict=True)
        ]
        found = []
        for start in range(0, len(queries), 32):  # batches as served
            found += retriever.retrieve_batch(queries[start : start + 32])
        hits = sum(int(np.isin(t, f.sku_ids).sum()) for t, f in zip(truth, found, strict=True))
        total = sum(t.size for t in truth)
        out[nprobe] = hits / total if total else 1.0
    return out
