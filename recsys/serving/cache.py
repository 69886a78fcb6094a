"""Result cache: a feed refresh that would compute the same answer gets the stored one.

A result depends on the request (user, delivery location, surface, platform, number of results,
exclusions, hour), on the user's assignment (the merged arm parameters, which carry the model
version an arm pins), and on the serving snapshot (experiment config, routing, availability,
model and index versions). The assignment is itself a function of the request's user, surface,
platform and whether it has a location, under the snapshot's experiment config, so the key holds
the request's part only and is looked up before the per-request stages: a hit runs none of them
and answers with the assignment (exposures) the entry was computed with. The snapshot is held by
identity: every control-plane or artifact change swaps in a new snapshot, and the first lookup
against a new one empties the cache. Nothing stale can be served.

The location is keyed by a cell of ``cell_degrees`` (about 500 m by default): refreshes from
the same address (GPS jitter included) share an entry, and the answer is the one computed for
the first location seen in that cell. Entries are bounded (least recently used go first).
Owned by the pipeline and used on the event loop only, so it takes no lock.

An entry is the answer taken apart into one tuple of strings, numbers, bytes, numpy arrays and
tuples of those (:func:`freeze`), and a hit builds its :class:`~recsys.types.Recommendation`
back from it (:func:`thaw`). The garbage collector tracks none of that (a pass stops tracking
a tuple once nothing it holds is tracked), whereas an answer kept as built has about eight
tracked objects: a full pass walked them all, and every request queued meanwhile waited. With
50,000 answers cached a full pass took 69 ms kept as built against 0.4 ms kept this way, as with
none (benchmarks/bench_gc_cache.py, 4M world); a hit costs 2-7 µs more in the servicer to build
back (benchmarks/bench_hit_path.py).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable
from itertools import starmap
from typing import Any

from recsys.types import Encodings, Exposure, Location, Recommendation, Request, ScoredItems

DEFAULT_CELL_DEGREES = 0.005

CacheKey = tuple[Hashable, ...]

Entry = tuple[Any, ...]
"""A cached answer as :func:`freeze` lays it out."""

HIT_STAGES: tuple[tuple[str, float], ...] = (("cache", 0.0),)
"""The stages a cache hit went through: none but the lookup."""


def location_cell(lat: float, lon: float, cell_degrees: float) -> tuple[int, int]:
    return math.floor(lat / cell_degrees), math.floor(lon / cell_degrees)


def cache_key(request: Request, cell_degrees: float = DEFAULT_CELL_DEGREES) -> CacheKey:
    """Everything of the request that the answer depends on under one snapshot (the user's
    assignment included: it is drawn from the user, surface, platform and has-location)."""
    location = request.location
    cell = None if location is None else location_cell(location.lat, location.lon, cell_degrees)
    return (
        request.user_id,
        cell,
        request.surface,
        request.platform,
        request.num_results,
        request.exclude_sku_ids,
        request.hour,
    )


class ResultCache:
    """At most ``max_entries`` recommendations of the current snapshot, least recent out first."""

    def __init__(self, max_entries: int) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries is {max_entries}; expected >= 0 (0 turns it off)")
        self.max_entries = max_entries
        self._entries: OrderedDict[CacheKey, Entry] = OrderedDict()
        self._snapshot: object = None
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def __len__(self) -> int:
        return len(self._entries)

    def _follow(self, snapshot: object) -> None:
        if snapshot is not self._snapshot:
            self._entries.clear()
            self._snapshot = snapshot

    def get(self, snapshot: object, key: CacheKey, request_id: str) -> Recommendation | None:
        """The stored answer for ``key`` under ``snapshot``, as the answer to ``request_id``
        (:func:`thaw`), or None (counted as a miss)."""
        self._follow(snapshot)
        found = self._entries.get(key)
        if found is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return thaw(found, request_id)

    def put(self, snapshot: object, key: CacheKey, recommendation: Recommendation) -> None:
        """Store an answer computed on ``snapshot`` (dropped if the snapshot changed since)."""
        if not self.enabled or snapshot is not self._snapshot:
            return
        self._entries[key] = freeze(recommendation)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


def freeze(answer: Recommendation) -> Entry:
    """``answer`` as a tuple the garbage collector will not track (its stage timings are left
    out: a hit reports :data:`HIT_STAGES`). Its ``encodings`` are kept as they are now, so they
    should be complete (serving/wire.py's ``encode_ahead`` makes them in the batch's thread)."""
    items = answer.items
    candidates = answer.candidates
    origin = answer.computed_for
    encodings = answer.encodings
    return (
        answer.model_version,
        answer.index_version,
        answer.config_version,
        tuple((e.layer, e.experiment, e.arm, e.bucket, e.forced) for e in answer.exposures),
        answer.degraded_reasons,
        answer.snapshot_id,
        (items.sku_ids, items.restaurant_ids, items.scores),
        answer.user_features,
        None
        if candidates is None
        else (candidates.sku_ids, candidates.restaurant_ids, candidates.scores),
        None if origin is None else _request_fields(origin),
        None
        if encodings is None
        else (encodings.response, encodings.record, encodings.score_counts),
    )


def thaw(entry: Entry, request_id: str) -> Recommendation:
    """The answer :func:`freeze` took apart, served from the cache to ``request_id``."""
    (
        model_version,
        index_version,
        config_version,
        exposures,
        degraded_reasons,
        snapshot_id,
        items,
        user_features,
        candidates,
        origin,
        encoded,
    ) = entry
    return Recommendation(
        request_id=request_id,
        items=ScoredItems(*items),
        model_version=model_version,
        index_version=index_version,
        config_version=config_version,
        exposures=tuple(starmap(Exposure, exposures)),
        degraded_reasons=degraded_reasons,
        stage_seconds=HIT_STAGES,
        snapshot_id=snapshot_id,
        user_features=user_features,
        candidates=None if candidates is None else ScoredItems(*candidates),
        cached=True,
        computed_for=None if origin is None else _request(origin),
        encodings=None if encoded is None else Encodings(*encoded),
    )


def _request_fields(request: Request) -> tuple[Any, ...]:
    location = request.location
    return (
        request.request_id,
        request.user_id,
        request.num_results,
        None if location is None else (location.lat, location.lon),
        request.surface,
        request.platform,
        request.exclude_sku_ids,
        request.hour,
    )


def _request(fields: tuple[Any, ...]) -> Request:
    request_id, user_id, num_results, location, surface, platform, exclude, hour = fields
    return Request(
        request_id,
        user_id,
        num_results,
        None if location is None else Location(*location),
        surface,
        platform,
        exclude,
        hour,
    )
