"""Exposures x outcome events, by request id, with late events allowed.

An exposure record says what one response showed; outcome events say what the user did with
it, possibly minutes later (a click after the impression, an order after the click). A request
stays open for ``late_seconds`` after its exposure's ``ts``; events in that window are joined,
later ones are counted (``late_dropped``), never silently lost. Rules:

- a click without an impression counts as an impression; an order implies a click;
- the same (request, position, event) twice is one event (``duplicates``: at-least-once sinks);
- an event for a request id no exposure has is an ``orphan`` (once its own window has passed:
  the event may be read before its exposure); one for an item the request did not serve at
  that position is ``unserved``;
- a second exposure record with the same request id is ignored (``duplicate_exposures``).

:class:`OutcomeJoiner` is the streaming form (feed records and events as they come, call
:meth:`OutcomeJoiner.advance` with the clock); :func:`join_outcomes` joins two finite streams.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from recsys.outcomes.events import OutcomeEvent

DEFAULT_LATE_SECONDS = 600.0
_KIND_INDEX = {"impression": 0, "click": 1, "order": 2}


@dataclass(frozen=True)
class JoinedRequest:
    """One served list and what the user did with each item (arrays aligned with ``sku_ids``)."""

    request_id: str
    ts: float
    user_id: str
    surface: str
    model_version: str
    exposures: tuple[tuple[str, str, str], ...]
    """(layer, experiment, arm) per experiment the request was in."""
    sku_ids: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float32]
    user_features: npt.NDArray[np.float64] | None
    impressed: npt.NDArray[np.bool_]
    clicked: npt.NDArray[np.bool_]
    ordered: npt.NDArray[np.bool_]
    complete: bool
    """The late window closed before the join emitted the request: no event can still come."""
    hour: int = 12
    location: tuple[float, float] | None = None

    @property
    def arm(self) -> str:
        """``experiment/arm`` pairs joined by ``,`` ("" outside every experiment)."""
        return ",".join(f"{experiment}/{arm}" for _layer, experiment, arm in self.exposures)


@dataclass
class JoinStats:
    exposures: int = 0
    """Exposure records read."""
    duplicate_exposures: int = 0
    bad_exposures: int = 0
    """Exposure records missing a field the join needs (skipped)."""
    requests: int = 0
    """Requests emitted (joined or not)."""
    events: int = 0
    """Outcome events read."""
    joined: int = 0
    """Events applied to a request."""
    late_dropped: int = 0
    """Events that came after their request's window (``ts > exposure ts + late_seconds``)."""
    orphans: int = 0
    """Events for a request id no exposure record has."""
    unserved: int = 0
    """Events naming an item the request did not serve at that position."""
    duplicates: int = 0
    """Events seen before (same request, position and kind)."""


class _Open:
    """A request whose window is open: its exposure and the flags events set so far."""

    __slots__ = ("flags", "record", "seen", "sku_ids", "ts")

    def __init__(self, record: Mapping[str, Any], ts: float, sku_ids: npt.NDArray[np.int64]):
        self.record = record
        self.ts = ts
        self.sku_ids = sku_ids
        self.flags = np.zeros((3, sku_ids.shape[0]), np.bool_)
        self.seen: set[tuple[int, int]] = set()

    def apply(self, event: OutcomeEvent, late_seconds: float, stats: JoinStats) -> None:
        if event.ts > self.ts + late_seconds:
            stats.late_dropped += 1
            return
        position = event.position
        if position >= self.sku_ids.shape[0] or int(self.sku_ids[position]) != event.sku_id:
            stats.unserved += 1
            return
        key = (position, _KIND_INDEX[event.event])
        if key in self.seen:
            stats.duplicates += 1
            return
        self.seen.add(key)
        self.flags[: key[1] + 1, position] = True  # an order is a click is an impression
        stats.joined += 1

    def joined(self, complete: bool) -> JoinedRequest:
        record = self.record
        features = record.get("user_features")
        location = record.get("location")
        return JoinedRequest(
            request_id=str(record["request_id"]),
            ts=self.ts,
            user_id=str(record.get("user_id", "")),
            surface=str(record.get("surface", "")),
            model_version=str(record.get("model_version", "")),
            exposures=tuple(
                (str(e.get("layer", "")), str(e.get("experiment", "")), str(e.get("arm", "")))
                for e in record.get("exposures") or ()
            ),
            sku_ids=self.sku_ids,
            scores=np.asarray(record.get("scores") or (), np.float32),
            user_features=None if features is None else np.asarray(features, np.float64),
            impressed=self.flags[0],
            clicked=self.flags[1],
            ordered=self.flags[2],
            complete=complete,
            hour=int(record.get("hour", 12)),
            location=None if not location else (float(location[0]), float(location[1])),
        )


class OutcomeJoiner:
    """Streaming join: :meth:`add_exposure` and :meth:`add_event` in any interleaving, then
    :meth:`advance` with the current time emits every request whose window has closed
    (``complete``) in the order the exposures came; :meth:`flush` emits the rest, incomplete.

    Memory: the open requests, the events waiting for their exposure, and the ids of requests
    emitted within the last ``late_seconds`` (so a late event counts as late, not as an orphan).
    """

    def __init__(self, *, late_seconds: float = DEFAULT_LATE_SECONDS) -> None:
        if not late_seconds >= 0 or math.isinf(late_seconds):
            raise ValueError(f"late_seconds is {late_seconds}; expected a finite number >= 0")
        self.late_seconds = late_seconds
        self.stats = JoinStats()
        self._open: dict[str, _Open] = {}
        self._order: deque[str] = deque()
        self._waiting: dict[str, list[OutcomeEvent]] = {}
        self._closed: dict[str, float] = {}

    @property
    def open_requests(self) -> int:
        return len(self._open)

    def add_exposure(self, record: Mapping[str, Any]) -> None:
        self.stats.exposures += 1
        try:
            request_id = str(record["request_id"])
            ts = float(record["ts"])
            sku_ids = np.asarray(record["sku_ids"], np.int64).reshape(-1)
        except (KeyError, TypeError, ValueError):
            self.stats.bad_exposures += 1
            return
        if request_id in self._open or request_id in self._closed:
            self.stats.duplicate_exposures += 1
            return
        request = _Open(record, ts, sku_ids)
        self._open[request_id] = request
        self._order.append(request_id)
        for event in self._waiting.pop(request_id, ()):
            request.apply(event, self.late_seconds, self.stats)

    def add_event(self, event: OutcomeEvent) -> None:
        self.stats.events += 1
        request = self._open.get(event.request_id)
        if request is not None:
            request.apply(event, self.late_seconds, self.stats)
        elif event.request_id in self._closed:
            self.stats.late_dropped += 1
        else:
            self._waiting.setdefault(event.request_id, []).append(event)

    def advance(self, now: float) -> list[JoinedRequest]:
        """Emit the requests whose window closed by ``now`` (complete) and count the events
        whose exposure never came within their own window as orphans."""
        out: list[JoinedRequest] = []
        while self._order:
            request = self._open[self._order[0]]
            if request.ts + self.late_seconds > now:
                break
            out.append(self._emit(self._order.popleft(), complete=True))
        for request_id, ts in list(self._closed.items()):
            if ts + 2 * self.late_seconds <= now:
                del self._closed[request_id]
        for request_id, events in list(self._waiting.items()):
            if max(e.ts for e in events) + self.late_seconds <= now:
                self.stats.orphans += len(events)
                del self._waiting[request_id]
        return out

    def flush(self, *, complete: bool = False) -> list[JoinedRequest]:
        """Emit every open request (``complete`` as given) and count waiting events as
        orphans: the end of the input."""
        out = [self._emit(request_id, complete) for request_id in self._order]
        self._order.clear()
        self.stats.orphans += sum(len(events) for events in self._waiting.values())
        self._waiting.clear()
        return out

    def add_final_exposure(self, record: Mapping[str, Any], *, now: float) -> JoinedRequest | None:
        """Add an exposure whose events are all in already and emit it at once (complete if
        ``now`` is past its window); None for a duplicate or unreadable record."""
        before = len(self._order)
        self.add_exposure(record)
        if len(self._order) == before:
            return None
        request_id = self._order.pop()
        request = self._open[request_id]
        return self._emit(request_id, complete=now >= request.ts + self.late_seconds)

    def _emit(self, request_id: str, complete: bool) -> JoinedRequest:
        request = self._open.pop(request_id)
        self._closed[request_id] = request.ts
        self.stats.requests += 1
        return request.joined(complete)


def join_outcomes(
    exposure_records: Iterable[Mapping[str, Any]],
    events: Iterable[OutcomeEvent],
    *,
    late_seconds: float = DEFAULT_LATE_SECONDS,
    now: float | None = None,
    stats: JoinStats | None = None,
) -> Iterator[JoinedRequest]:
    """Join finite streams: every event is read first (grouped by request id), then the
    exposures are streamed, one joined request each, in their order. A request is ``complete``
    when ``now`` (default: the latest event's ``ts``) is past its window. ``stats``, if given,
    is filled as the join runs (final once the iterator is exhausted)."""
    joiner = OutcomeJoiner(late_seconds=late_seconds)
    if stats is not None:
        joiner.stats = stats
    horizon = -math.inf
    for event in events:
        joiner.add_event(event)
        horizon = max(horizon, event.ts)
    if now is not None:
        horizon = now
    for record in exposure_records:
        joined = joiner.add_final_exposure(record, now=horizon)
        if joined is not None:
            yield joined
    joiner.flush()
