"""Shedding at light load and behaviour at overload, against a real `recsys serve`.

Copies ``--artifacts`` to a temporary root, makes sure it holds a second ranker version, and
starts `recsys serve` on it (cache off, so every call reaches the batcher) with the control
plane in Redis (``--control``, a private key prefix, removed at the end). Then:

1. **light load with promotions**: ``--clients`` closed-loop clients (6) for the whole phase
   while ``--promotions`` routing writes (50) alternate the production version, one every
   ``--promotion-interval`` seconds. Counts every status code: RESOURCE_EXHAUSTED here is a
   shed at light load (the target is 0).
2. **unloaded**: one closed-loop client for ``--seconds``: the unloaded p99.
3. **capacity**: ``--saturate-clients`` closed-loop clients for ``--seconds``: answered calls/s.
4. **overload**: an open loop at ``--overload`` x capacity (3) for ``--seconds``: p99 of the
   admitted (answered) calls, counted from each call's scheduled send time, against the
   unloaded p99; and how fast sheds answer (from the call's actual send).

The server's GC pauses (``recsys_gc_pause_seconds``) and sheds (``recsys_requests_total``)
come from its /metrics. Extra ``--serve-arg`` values go to `recsys serve`.

    python -m benchmarks.bench_overload --artifacts /tmp/art [--seconds 15] [--promotions 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from benchmarks.bench_latency import free_port, make_requests, wait_serving_for
from benchmarks.bench_swap import NAME, copy_with_two_versions, delete_prefix, write_route
from recsys.artifacts import ArtifactRoot, versions
from recsys.control.backends import open_store
from recsys.ranking.registry import ModelRegistry
from recsys.v1 import recommender_pb2, recommender_pb2_grpc

CHANNELS = 4
SHED = "RESOURCE_EXHAUSTED"


@dataclass
class Tally:
    """Status codes, latencies of answered calls, and how long sheds took to answer."""

    codes: dict[str, int] = field(default_factory=dict)
    answered: list[float] = field(default_factory=list)
    shed: list[float] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)
    """One example of each status's details."""

    def add(
        self, code: str, seconds: float, shed_seconds: float | None = None, details: str = ""
    ) -> None:
        self.codes[code] = self.codes.get(code, 0) + 1
        if code != "OK" and code not in self.details:
            self.details[code] = details
        if code == "OK":
            self.answered.append(seconds)
        elif code == SHED:
            self.shed.append(seconds if shed_seconds is None else shed_seconds)


def loadavg() -> list[str]:
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


def ms(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(np.array(values) * 1000, q)), 2) if values else None


async def call(
    stub: recommender_pb2_grpc.RecommenderAsyncStub, request: recommender_pb2.RecommendRequest
) -> tuple[str, str]:
    """The call's status code name and details."""
    try:
        await stub.Recommend(request, timeout=10)
    except grpc.aio.AioRpcError as e:
        return str(e.code().name), e.details() or ""
    return "OK", ""


async def closed_loop(
    stubs: Sequence[recommender_pb2_grpc.RecommenderAsyncStub],
    requests: Sequence[recommender_pb2.RecommendRequest],
    clients: int,
    until: asyncio.Event,
) -> Tally:
    tally = Tally()

    async def client(n: int) -> None:
        stub, k = stubs[n % len(stubs)], n
        while not until.is_set():
            request = requests[k % len(requests)]
            k += clients
            start = time.perf_counter()
            code, details = await call(stub, request)
            tally.add(code, time.perf_counter() - start, details=details)

    await asyncio.gather(*(client(n) for n in range(clients)))
    return tally


async def timed_closed_loop(
    stubs: Sequence[recommender_pb2_grpc.RecommenderAsyncStub],
    requests: Sequence[recommender_pb2.RecommendRequest],
    clients: int,
    seconds: float,
) -> Tally:
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(seconds, stop.set)
    return await closed_loop(stubs, requests, clients, stop)


async def open_loop(
    stubs: Sequence[recommender_pb2_grpc.RecommenderAsyncStub],
    requests: Sequence[recommender_pb2.RecommendRequest],
    rate: float,
    seconds: float,
) -> Tally:
    """Send at ``rate`` per second on schedule: answered latency counts from the scheduled
    time (a stall is not hidden), shed latency from the actual send."""
    tally = Tally()
    start = time.perf_counter()

    async def one(n: int, due: float) -> None:
        sent = time.perf_counter()
        code, details = await call(stubs[n % len(stubs)], requests[n % len(requests)])
        now = time.perf_counter()
        tally.add(code, now - due, now - sent, details)

    tasks = []
    for n in range(int(rate * seconds)):
        due = start + n / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(n, due)))
    await asyncio.gather(*tasks)
    return tally


def scrape(port: int) -> dict[str, float]:
    """The server's GC pause and request counters, by sample name and labels."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    wanted = ("recsys_gc_pause_seconds", "recsys_requests_total")
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(wanted)
    }


def gc_summary(before: dict[str, float], after: dict[str, float]) -> dict[str, object]:
    out: dict[str, object] = {}
    for generation in ("0", "1", "2"):
        label = f'{{generation="{generation}"}}'
        count = after.get(f"recsys_gc_pause_seconds_count{label}", 0.0) - before.get(
            f"recsys_gc_pause_seconds_count{label}", 0.0
        )
        total = after.get(f"recsys_gc_pause_seconds_sum{label}", 0.0) - before.get(
            f"recsys_gc_pause_seconds_sum{label}", 0.0
        )
        out[f"gen{generation}"] = {
            "collections": int(count),
            "mean_ms": round(total / count * 1000, 2) if count else None,
        }
    return out


async def run(
    args: argparse.Namespace, root: Path, target: str, metrics_port: int
) -> dict[str, object]:
    store = open_store(args.control, root, prefix=args.prefix)
    registry = ModelRegistry(ArtifactRoot(root), store)
    routing, _ = registry.routing()
    first = routing.models[NAME].production
    second = next(v for v in reversed(versions(root / "models" / NAME)) if v != first)
    requests = make_requests(root, 5000, seed=5)
    channels = [grpc.aio.insecure_channel(target) for _ in range(CHANNELS)]
    stubs = [recommender_pb2_grpc.RecommenderStub(c) for c in channels]
    result: dict[str, object] = {"loadavg_start": loadavg()}
    try:
        await timed_closed_loop(stubs, requests, args.clients, 3.0)  # warm-up

        # 1. light load with promotions
        before = scrape(metrics_port)
        stop = asyncio.Event()
        load = asyncio.ensure_future(closed_loop(stubs, requests, args.clients, stop))
        production, previous = first, second
        for _ in range(args.promotions):
            production, previous = previous, production
            await asyncio.to_thread(write_route, store, production, previous)
            await asyncio.sleep(args.promotion_interval)
        await asyncio.sleep(1.0)
        stop.set()
        light = await load
        after = scrape(metrics_port)
        result["light_load"] = {
            "clients": args.clients,
            "promotions": args.promotions,
            "calls": sum(light.codes.values()),
            "codes": light.codes,
            "details": light.details,
            "sheds": light.codes.get(SHED, 0),
            "p50_ms": ms(light.answered, 50),
            "p99_ms": ms(light.answered, 99),
            "max_ms": ms(light.answered, 100),
            "server_gc": gc_summary(before, after),
            "loadavg": loadavg(),
        }

        # 2. unloaded, 3. capacity, 4. overload
        unloaded = await timed_closed_loop(stubs, requests, 1, args.seconds)
        saturated = await timed_closed_loop(stubs, requests, args.saturate_clients, args.seconds)
        capacity = len(saturated.answered) / args.seconds
        rate = args.overload * capacity
        over = await open_loop(stubs, requests, rate, args.seconds)
        unloaded_p99 = ms(unloaded.answered, 99)
        admitted_p99 = ms(over.answered, 99)
        result["overload"] = {
            "unloaded_p50_ms": ms(unloaded.answered, 50),
            "unloaded_p99_ms": unloaded_p99,
            "capacity_per_s": round(capacity, 1),
            "saturated_codes": saturated.codes,
            "offered_per_s": round(rate, 1),
            "codes": over.codes,
            "details": over.details,
            "admitted_per_s": round(len(over.answered) / args.seconds, 1),
            "admitted_p50_ms": ms(over.answered, 50),
            "admitted_p99_ms": admitted_p99,
            "admitted_p99_over_unloaded_p99": (
                round(admitted_p99 / unloaded_p99, 2) if admitted_p99 and unloaded_p99 else None
            ),
            "shed_p50_ms": ms(over.shed, 50),
            "shed_p99_ms": ms(over.shed, 99),
            "shed_max_ms": ms(over.shed, 100),
            "loadavg": loadavg(),
        }
    finally:
        for c in channels:
            await c.close(None)
        store.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--control", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--promotions", type=int, default=50)
    parser.add_argument("--promotion-interval", type=float, default=0.5)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--saturate-clients", type=int, default=32)
    parser.add_argument("--overload", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=8, help="seed of the second ranker version")
    parser.add_argument("--serve-arg", action="append", default=[], help="passed to recsys serve")
    args = parser.parse_args()
    args.prefix = f"bench-overload-{uuid.uuid4().hex[:8]}:"

    with tempfile.TemporaryDirectory(prefix="bench-overload-") as tmp:
        root = copy_with_two_versions(args.artifacts, Path(tmp), args.seed)
        port, metrics_port = free_port(), free_port()
        cmd = [
            sys.executable, "-m", "recsys.cli.main", "serve", "--artifacts", str(root),
            "--port", str(port), "--metrics-port", str(metrics_port), "--cache-entries", "0",
            "--control", args.control, "--control-prefix", args.prefix,
            "--exposure-dir", str(Path(tmp) / "exposures"), *args.serve_arg,
        ]  # fmt: skip
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            asyncio.run(wait_serving_for(f"127.0.0.1:{port}", 300))
            result = asyncio.run(run(args, root, f"127.0.0.1:{port}", metrics_port))
        finally:
            server.terminate()
            server.wait(timeout=60)
            delete_prefix(args.control, args.prefix)
    result["command"] = " ".join(["python -m benchmarks.bench_overload", *sys.argv[1:]])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
