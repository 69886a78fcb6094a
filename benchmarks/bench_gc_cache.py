"""What the result cache costs the garbage collector: a full pass against the answers it holds.

A worker keeps up to ``--cache-entries`` answers (50,000 by default). A full pass (generation
2) walks every tracked object that is not frozen, and stalls every thread of the worker while
it does; the loaded heap is frozen (serving/gc_tuning.py), the cache fills after, so what the
cache's answers cost a pass is what the collector tracks of them (serving/cache.py keeps them
in a form it does not track; kept as built, each was about eight tracked objects). This opens
the real pipeline on a built world, as ``recsys serve`` does (the loaded heap frozen the same
way), fills the cache with distinct requests through the servicer, 32 at a time as a loaded
worker batches them, and at each of ``--entries`` cached answers times a full pass (the median
of ``--passes``) and counts the objects the collector tracks. One JSON line per size.

    python -m benchmarks.bench_gc_cache --artifacts /tmp/art4m [--entries 5000,20000,50000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.bench_hit_path import open_service
from benchmarks.bench_throughput import make_requests
from recsys.serving.gc_tuning import freeze_loaded_heap
from recsys.serving.pipeline import Pipeline
from recsys.serving.servicer import RecommenderService
from recsys.settings import ServeSettings
from recsys.v1 import recommender_pb2

CALLS_AT_ONCE = 32
"""Requests served together while filling (one batch of a loaded worker)."""


def full_pass_ms(passes: int) -> float:
    """The median wall ms of ``passes`` full collections, after one that clears the garbage."""
    gc.collect()
    times = []
    for _ in range(passes):
        started = time.perf_counter()
        gc.collect(2)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


async def measure(artifacts: Path, sizes: Sequence[int], passes: int) -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory(prefix="bench-gc-cache-") as exposures:
        settings = ServeSettings(
            artifacts=artifacts,
            port=0,
            metrics_port=0,
            exposure_dir=Path(exposures),
            cache_entries=max(sizes),
        )
        async with open_service(settings) as (pipeline, service):
            # Distinct requests, some in one cache cell: a quarter more than the largest size.
            # Made before the freeze, so that they are frozen with the loaded heap: a server
            # does not hold its clients' requests, and 60,000 of them would double what a
            # pass walks.
            count = max(sizes) * 5 // 4 + CALLS_AT_ONCE
            requests = make_requests(artifacts, count, 0, "distinct")
            freeze_loaded_heap(settings.gc_gen0_threshold)  # as the server does before traffic
            rows: list[dict[str, object]] = []
            served = 0
            for size in sorted(sizes):
                row, more = await fill_and_measure(
                    pipeline, service, requests[served:], size, passes
                )
                served += more
                rows.append(row | {"requests_served": served})
            return rows


async def fill_and_measure(
    pipeline: Pipeline,
    service: RecommenderService,
    requests: list[recommender_pb2.RecommendRequest],
    size: int,
    passes: int,
) -> tuple[dict[str, object], int]:
    """Serve ``requests`` in turn until the cache holds ``size`` answers (or none are left),
    then time a full pass and count the tracked objects; and how many requests it served."""
    served = 0
    while pipeline.cached_answers < size and served < len(requests):
        calls = requests[served : served + CALLS_AT_ONCE]
        answers = await asyncio.gather(*(service.serve(r, None) for r in calls))
        refused = [code.name for code, _, _ in answers if code.name != "OK"]
        if refused:
            raise RuntimeError(f"filling the cache, calls were answered {refused}")
        served += len(calls)
    await asyncio.sleep(0.2)  # the exposure writer takes the records
    pass_ms = full_pass_ms(passes)
    row: dict[str, object] = {
        "cached_answers": pipeline.cached_answers,
        "tracked_objects": len(gc.get_objects()),
        "frozen_objects": gc.get_freeze_count(),
        "full_pass_ms": round(pass_ms, 2),
        "load": round(os.getloadavg()[0], 2),
    }
    return row, served


def sizes_of(text: str) -> list[int]:
    """``--entries``: cache sizes, comma-separated, each >= 0."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = [-1]
    if not sizes or min(sizes) < 0:
        raise argparse.ArgumentTypeError(f"--entries {text!r}: expected sizes >= 0, e.g. 0,5000")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--entries", type=sizes_of, default=[0, 5_000, 20_000, 50_000])
    parser.add_argument("--passes", type=int, default=3, help="full passes timed at each size")
    args = parser.parse_args()
    for row in asyncio.run(measure(args.artifacts, args.entries, args.passes)):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
