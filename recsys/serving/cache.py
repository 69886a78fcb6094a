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
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable

from recsys.types import Recommendation, Request

DEFAULT_CELL_DEGREES = 0.005

CacheKey = tuple[Hashable, ...]


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
        self._entries: OrderedDict[CacheKey, Recommendation] = OrderedDict()
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

    def get(self, snapshot: object, key: CacheKey) -> Recommendation | None:
        """The stored answer for ``key`` under ``snapshot``, or None (counted as a miss)."""
        self._follow(snapshot)
        found = self._entries.get(key)
        if found is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return found

    def put(self, snapshot: object, key: CacheKey, recommendation: Recommendation) -> None:
        """Store an answer computed on ``snapshot`` (dropped if the snapshot changed since)."""
        if not self.enabled or snapshot is not self._snapshot:
            return
        self._entries[key] = recommendation
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
