"""The result cache's hit rate over many server processes, routed by user or not.

A two-core machine runs two workers, not a fleet. This benchmark sends the throughput
benchmark's realistic mix (benchmarks/bench_throughput.py ``make_requests``, kind ``mix``)
through N result caches, the serving code's own (recsys/serving/cache.py: its key and its
bound), as N server processes would hold them, and counts the hits:

- ``user``: each call to the cache its user hashes to (serving/routing.py: the front and the
  clients' ring_hash channels), so each cache holds its users' feeds;
- ``spread``: each call to any cache, uniformly at random: calls balanced without regard to the
  user (least connections, round-robin, the kernel's SO_REUSEPORT over many connections).

No call is answered, so only the hit rate is measured, not CPU or latency; the front's bound
on one worker's load (bounded loads) is not modelled, nor is traffic over time (each cache's
entries expire only by its size bound).

    python -m benchmarks.bench_routing --artifacts /tmp/art4m --processes 1 2 4 16 256
"""

from __future__ import annotations

import argparse
import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_throughput import make_requests
from recsys.serving.cache import ResultCache, cache_key
from recsys.serving.validation import validate_request
from recsys.types import Recommendation, Request, ScoredItems
from recsys.v1 import recommender_pb2

ROUTINGS = ("user", "spread")
SNAPSHOT = object()
"""One serving snapshot for the whole run: no entry is dropped by a control-plane change."""
NO_ITEMS = np.zeros(0, dtype=np.int64)
ANSWER = Recommendation(
    "", ScoredItems(NO_ITEMS, NO_ITEMS, NO_ITEMS.astype(np.float32)), "", "", ""
)
"""What each cache holds: the hit rate does not depend on the answer."""


def requests_of(messages: Sequence[recommender_pb2.RecommendRequest]) -> list[Request]:
    """The requests as the servicer validates them (the hour fixed, as one lunch hour)."""
    return [validate_request(m, hour=12) for m in messages]


def user_cache(user_id: str, processes: int) -> int:
    """The cache a user's calls go to (a stable hash of the id, as a proxy's would be)."""
    return zlib.crc32(user_id.encode()) % processes


def caches_hit_rate(
    requests: Sequence[Request], processes: int, routing: str, entries: int, seed: int
) -> float:
    """The share of ``requests`` answered from a cache, over ``processes`` caches of
    ``entries`` each, routed by ``routing``."""
    if routing not in ROUTINGS:
        raise ValueError(f"routing {routing!r}: expected one of {', '.join(ROUTINGS)}")
    caches = [ResultCache(entries) for _ in range(processes)]
    if routing == "user":
        chosen = [user_cache(r.user_id, processes) for r in requests]
    else:
        chosen = np.random.default_rng(seed).integers(0, processes, size=len(requests)).tolist()
    for request, n in zip(requests, chosen, strict=True):
        cache, key = caches[n], cache_key(request)
        if cache.get(SNAPSHOT, key, request.request_id) is None:
            cache.put(SNAPSHOT, key, ANSWER)
    hits = sum(c.hits for c in caches)
    return hits / len(requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--requests", type=int, default=150_000, help="calls of the mix")
    parser.add_argument(
        "--processes", type=int, nargs="+", default=[1, 2, 4, 16, 256], help="caches (servers)"
    )
    parser.add_argument(
        "--cache-entries", type=int, default=50_000, help="each cache's bound (serve's default)"
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.requests < 1:
        parser.error(f"--requests {args.requests}: expected >= 1")
    if any(n < 1 for n in args.processes):
        parser.error(f"--processes {args.processes}: expected each >= 1")
    if args.cache_entries < 1:
        parser.error(f"--cache-entries {args.cache_entries}: expected >= 1")
    requests = requests_of(make_requests(args.artifacts, args.requests, args.seed, "mix"))
    for processes in args.processes:
        row: dict[str, Any] = {"processes": processes, "requests": len(requests)}
        for routing in ROUTINGS:
            rate = caches_hit_rate(requests, processes, routing, args.cache_entries, args.seed)
            row[f"hit_rate_{routing}"] = round(rate, 4)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
