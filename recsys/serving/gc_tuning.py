"""The garbage collector of a serving process: frozen after loading, measured while serving.

A full collection walks every tracked object. A loaded server holds a large, long-lived heap
(the world, feature tables, models, the index's Python wrappers), so a full pass took 93 to
190 ms on the default world and stalled every request queued meanwhile: the cause of the
RESOURCE_EXHAUSTED answers at light load (docs/security.md, benchmarks/README.md).

- :func:`freeze_loaded_heap` runs one collection once the pipeline is open, then
  ``gc.freeze()``: what was loaded moves to the permanent generation, which no later pass
  walks, so full passes cost what requests allocate, not the size of the world.
- The young generation's threshold (``gc_gen0_threshold``) sets how much a young pass walks,
  and so how long it stalls every thread. What it collects is mostly gRPC's: grpc.aio looks
  up each call's method handler in a coroutine (``_find_method_handler``) whose locals hold a
  closure over those same locals, so every call leaves about six objects in a reference cycle
  (the coroutine's scope, the closure, the handler call details, the call's metadata), which
  reference counting never frees; a pass frees what piled up since the last one. At a
  threshold of 10,000 a young pass took 7-13 ms on average on the 4M world's mix; at
  Python's own 700, 0.5-0.6 ms, at the same or a lower share of the time (benchmarks/
  README.md, "Nineteenth round"). Reference counting frees everything else at once.
- :class:`GcPauses` times every pass through ``gc.callbacks`` into
  ``recsys_gc_pause_seconds{generation}`` and counts what it freed into
  ``recsys_gc_collected_objects{generation}``, so a stall and its cause show in the metrics.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

PauseObserver = Callable[[int, float, int], None]
"""Called with (generation, seconds, objects collected) after every collection."""


class GcPauses:
    """Times garbage-collection passes (any thread) while installed."""

    def __init__(self, observe: PauseObserver) -> None:
        self._observe = observe
        self._started = threading.local()
        self._installed = False

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started.at = time.perf_counter()
            return
        started = getattr(self._started, "at", None)
        if started is None:
            return
        self._started.at = None
        try:
            self._observe(
                int(info.get("generation", 0)),
                time.perf_counter() - started,
                int(info.get("collected", 0)),
            )
        except Exception:  # a metrics failure inside the collector must not propagate
            log.exception("observing a garbage-collection pause failed")

    def install(self) -> None:
        if not self._installed:
            gc.callbacks.append(self._callback)
            self._installed = True

    def remove(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._callback)
            self._installed = False


def freeze_loaded_heap(gen0_threshold: int) -> None:
    """After loading: collect once, freeze what is left, set the young threshold.

    ``gen0_threshold`` 0 leaves the collector as Python configures it (no freeze either).
    """
    if gen0_threshold <= 0:
        return
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(gen0_threshold, older, oldest)
    log.info(
        "garbage collector: %d loaded objects frozen in %.0f ms; young threshold %d",
        gc.get_freeze_count(),
        (time.perf_counter() - started) * 1000,
        gen0_threshold,
    )
