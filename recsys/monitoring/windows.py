"""Sliding windows of binned live values per (model version, arm), and their statistics.

:class:`DriftWindows` is the in-server accumulator: the batched path adds each batch's slot
counts (:meth:`DriftWindows.add`, a few numpy additions under a lock), and whoever reads (the
Prometheus collector at scrape time, the summary writer, the retraining loop) asks for
:meth:`DriftWindows.stats`: for every (version, arm) with traffic in the window, and for every
version over all its arms (arm ``all``), per column (every feature and the score):

- PSI and Jensen-Shannon against the **training baseline** (``psi``, ``js``): how far live
  traffic is from what the model was trained on. Served items are the model's own top picks,
  while training rows are impressions of the policy that logged them, so this is large on a
  healthy server too (selection, not drift): it is shown, not alerted on;
- PSI and Jensen-Shannon against the **live reference** (``drift_psi``, ``drift_js``): the
  first full window of that (version, arm) with at least ``min_requests`` requests, frozen.
  This measures change while the model stays fixed, which is what drift is; the alert rules use
  it (docs/monitoring.md);
- the share of NaN values and of values outside the training range (or unseen categories).

A window is ``slots`` ring slots of ``window_seconds / slots`` each: the window slides by one
slot at a time and memory stays fixed however long the server runs. (version, arm) keys are
capped (``max_keys``); the batches of keys beyond the cap are counted as dropped, never labelled.

:func:`window_stats` is the same computation for counts from elsewhere (the report, a test).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from recsys.monitoring.baseline import SCORE, BaselineBins
from recsys.monitoring.statistics import js_distance, psi

DEFAULT_WINDOW_SECONDS = 300.0
DEFAULT_SLOTS = 10
DEFAULT_MAX_KEYS = 50
DEFAULT_MIN_REQUESTS = 1000
"""Requests a window needs before its PSI means anything (see docs/monitoring.md: the 20 items
of a request share the user and context, so requests, not items, are the sample size)."""
ALL_ARMS = "all"
"""The arm label of a version's windows summed over its arms."""


@dataclass(frozen=True)
class ColumnStats:
    """One feature's (or the score's) live distribution in a window against the baseline."""

    name: str
    rows: int
    """Values in the window, NaN included."""
    psi: float
    """Against the training baseline."""
    js: float
    drift_psi: float
    """Against the live reference window (NaN until there is one)."""
    drift_js: float
    nan_share: float
    out_of_range_share: float
    live: tuple[int, ...]
    """Live counts per baseline bin (out-of-range folded into the end bins)."""
    expected: tuple[float, ...]
    """Baseline counts per bin."""
    reference: tuple[int, ...]
    """Live reference counts per bin (empty until there is one)."""


@dataclass(frozen=True)
class WindowStats:
    """Everything the monitor knows about one (model version, arm) over one window."""

    model_version: str
    arm: str
    start: float
    end: float
    rows: int
    """Served items binned in the window."""
    requests: int
    columns: tuple[ColumnStats, ...]
    reference_start: float = math.nan
    """When the live reference window began (NaN: none yet)."""

    def column(self, name: str) -> ColumnStats:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"no column {name!r}; expected one of {[c.name for c in self.columns]}")

    @property
    def score(self) -> ColumnStats:
        return self.column(SCORE)

    def drifted(
        self, threshold: float, min_requests: int, ignore: tuple[str, ...] = ()
    ) -> tuple[str, ...]:
        """Columns whose PSI against the live reference exceeds ``threshold``, once the window
        holds ``min_requests`` requests (``ignore``: columns not to judge)."""
        if self.requests < min_requests:
            return ()
        return tuple(
            c.name for c in self.columns if c.drift_psi > threshold and c.name not in ignore
        )


def window_stats(
    bins: BaselineBins,
    arm: str,
    counts: npt.NDArray[np.int64],
    start: float,
    end: float,
    requests: int = 0,
    reference: npt.NDArray[np.int64] | None = None,
    reference_start: float = math.nan,
) -> WindowStats:
    """Statistics of one flat slot-count vector of ``bins``'s layout (``reference``: the live
    reference window's, same layout)."""
    columns = []
    for column in bins.columns:
        slots = counts[column.offset : column.offset + column.size]
        total = int(slots.sum())
        live = column.fold(slots)
        ref = (
            column.fold(reference[column.offset : column.offset + column.size])
            if reference is not None
            else None
        )
        columns.append(
            ColumnStats(
                name=column.name,
                rows=total,
                psi=psi(live, column.expected),
                js=js_distance(live, column.expected),
                drift_psi=math.nan if ref is None else psi(live, ref),
                drift_js=math.nan if ref is None else js_distance(live, ref),
                nan_share=int(slots[column.nan_slot]) / total if total else math.nan,
                out_of_range_share=column.out_of_range(slots) / total if total else math.nan,
                live=tuple(int(x) for x in live),
                expected=tuple(float(x) for x in column.expected),
                reference=() if ref is None else tuple(int(x) for x in ref),
            )
        )
    rows = int(counts[bins.columns[-1].offset : bins.size].sum())
    return WindowStats(
        bins.version, arm, start, end, rows, requests, tuple(columns), reference_start
    )


class _Ring:
    def __init__(self, bins: BaselineBins, slots: int, first_slot: int) -> None:
        self.bins = bins
        self.counts = np.zeros((slots, bins.size), dtype=np.int64)
        self.requests = np.zeros(slots, dtype=np.int64)
        self.slot_of_row = np.full(slots, -1, dtype=np.int64)
        self.first_slot = first_slot
        self.reference: npt.NDArray[np.int64] | None = None
        self.reference_slot = -1

    def window(self, slot: int, slots: int) -> tuple[npt.NDArray[np.int64], int]:
        live = self.slot_of_row > slot - slots
        return self.counts[live].sum(axis=0), int(self.requests[live].sum())


class DriftWindows:
    """Thread-safe sliding-window accumulator of slot counts per (model version, arm)."""

    def __init__(
        self,
        window_seconds: float = DEFAULT_WINDOW_SECONDS,
        slots: int = DEFAULT_SLOTS,
        max_keys: int = DEFAULT_MAX_KEYS,
        min_requests: int = DEFAULT_MIN_REQUESTS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if window_seconds <= 0 or slots < 1 or max_keys < 1:
            raise ValueError(
                f"window_seconds {window_seconds}, slots {slots}, max_keys {max_keys}: "
                "expected > 0, >= 1, >= 1"
            )
        self.window_seconds = window_seconds
        self.slots = slots
        self.max_keys = max_keys
        self.min_requests = min_requests
        self.dropped = 0
        """Batches' counts not kept because the (version, arm) cap was reached."""
        self._slot_seconds = window_seconds / slots
        self._clock = clock
        self._rings: dict[tuple[str, str], _Ring] = {}
        self._lock = threading.Lock()

    def add(
        self,
        counts: Iterable[tuple[str, str, int, npt.NDArray[np.int64]]],
        baselines: Mapping[str, BaselineBins],
    ) -> None:
        """Add a batch's ``Batch.drift_counts`` (laid out by ``baselines[version]``), to its
        (version, arm) and to (version, ``all``)."""
        slot = int(self._clock() // self._slot_seconds)
        with self._lock:
            for version, arm, requests, c in counts:
                bins = baselines.get(version)
                if bins is None or c.shape != (bins.size,):
                    continue
                self._add((version, arm), bins, slot, requests, c)
                if arm != ALL_ARMS:
                    self._add((version, ALL_ARMS), bins, slot, requests, c)

    def _add(
        self,
        key: tuple[str, str],
        bins: BaselineBins,
        slot: int,
        requests: int,
        counts: npt.NDArray[np.int64],
    ) -> None:
        ring = self._rings.get(key)
        if ring is None or ring.bins.size != bins.size:
            if ring is None and len(self._rings) >= self.max_keys:
                self.dropped += 1
                return
            ring = self._rings[key] = _Ring(bins, self.slots, slot)
        row = slot % self.slots
        if ring.slot_of_row[row] != slot:
            self._freeze_reference(ring, slot)
            ring.counts[row] = 0
            ring.requests[row] = 0
            ring.slot_of_row[row] = slot
        ring.counts[row] += counts
        ring.requests[row] += requests

    def _freeze_reference(self, ring: _Ring, slot: int) -> None:
        """At a slot boundary: the window that just closed becomes the live reference if it
        is the first full one with enough requests."""
        if ring.reference is not None or slot - ring.first_slot < self.slots:
            return
        counts, requests = ring.window(slot - 1, self.slots)
        if requests >= self.min_requests:
            ring.reference = counts
            ring.reference_slot = slot - self.slots

    def stats(self, now: float | None = None) -> list[WindowStats]:
        """The window ending ``now`` for every (version, arm) with traffic in it."""
        end = self._clock() if now is None else now
        slot = int(end // self._slot_seconds)
        out = []
        with self._lock:
            windows = []
            for (_, arm), ring in sorted(self._rings.items()):
                counts, requests = ring.window(slot, self.slots)
                if requests or counts.any():
                    reference_start = (
                        ring.reference_slot * self._slot_seconds
                        if ring.reference is not None
                        else math.nan
                    )
                    windows.append(
                        (ring.bins, arm, counts, requests, ring.reference, reference_start)
                    )
        start = end - self.window_seconds
        for bins, arm, counts, requests, reference, reference_start in windows:
            out.append(
                window_stats(bins, arm, counts, start, end, requests, reference, reference_start)
            )
        return out
