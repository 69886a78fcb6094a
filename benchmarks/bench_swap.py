"""Model swap storm against a real `recsys serve`: failures, lag, p99 during swaps, RSS.

Copies ``--artifacts`` to a temporary root (the source is not modified), makes sure it holds a
second ranker version (trains one with ``--seed`` if not), validates both through the registry,
and starts `recsys serve` on it with the control plane in Redis (``--control``, a private key
prefix, removed at the end). Concurrent clients then call Recommend without pause:

1. steady state for ``--steady-seconds`` (no swap);
2. swap 1 (a promotion), then RSS of the server;
3. swaps 2..``--swaps``, alternating rollback and promotion, each written ``--swap-interval``
   seconds after responses follow the previous one; then RSS again.

A swap is a routing write (the versions were validated once up front, as `recsys models
promote` does on every call; here the write alone is timed so the ops tool's CPU does not land
on the shared cores). Lag = from the write returning to the end of the first response that
started after it and names the new version. Reports requests, failed calls, lag p50/max,
p50/p99 in steady state and during swaps, and the server's RSS after 1 and after all swaps.

    python -m benchmarks.bench_swap --artifacts /tmp/art100 [--swaps 50] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import redis

from benchmarks.bench_latency import free_port, make_requests, wait_serving_for
from recsys.artifacts import ArtifactRoot, versions
from recsys.control.backends import open_store
from recsys.control.store import ROUTING, DocumentStore
from recsys.ranking.registry import ModelRegistry
from recsys.ranking.routing import parse_routing
from recsys.v1 import recommender_pb2, recommender_pb2_grpc

NAME = "ranker"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS")


@dataclass
class Load:
    phase: str = "warm-up"
    stop: bool = False
    records: list[tuple[str, float, float, str]] = field(default_factory=list)
    """(phase, start, end, model_version) of every answered call (monotonic seconds)."""
    failures: list[str] = field(default_factory=list)

    async def client(
        self,
        stub: recommender_pb2_grpc.RecommenderAsyncStub,
        requests: list[recommender_pb2.RecommendRequest],
    ) -> None:
        n = 0
        while not self.stop:
            request = requests[n % len(requests)]
            n += 1
            phase, start = self.phase, time.monotonic()
            try:
                reply = await stub.Recommend(request, timeout=30)
            except grpc.aio.AioRpcError as e:
                self.failures.append(f"{e.code()}: {e.details()}")
                continue
            self.records.append((phase, start, time.monotonic(), reply.model_version))

    async def wait_for(self, version: str, after: float) -> float:
        """Monotonic time at which the first call started after ``after`` names ``version``."""
        seen = 0
        while True:
            for _, start, end, served in self.records[seen:]:
                if start >= after and served == version:
                    return end
            seen = len(self.records)
            await asyncio.sleep(0.002)


def write_route(store: DocumentStore, production: str, previous: str) -> None:
    document = store.read(ROUTING)
    assert document is not None
    body = {**document.body, "models": {NAME: {"production": production, "previous": previous}}}
    parse_routing(body)
    store.write(ROUTING, body, expected_version=document.version, author="bench_swap")


async def storm(args: argparse.Namespace, root: Path, pid: int, target: str) -> dict[str, object]:
    store = open_store(args.control, root, prefix=args.prefix)
    registry = ModelRegistry(ArtifactRoot(root), store)
    routing, _ = registry.routing()
    first = routing.models[NAME].production
    second = next(v for v in reversed(versions(root / "models" / NAME)) if v != first)
    for version in (first, second):
        registry.validate(NAME, version)
    requests = make_requests(root, 5000, seed=3)
    load = Load()
    lags: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub: recommender_pb2_grpc.RecommenderAsyncStub = recommender_pb2_grpc.RecommenderStub(
            channel
        )  # an AsyncStub on an aio channel
        clients = [
            asyncio.create_task(load.client(stub, requests[n :: args.concurrency]))
            for n in range(args.concurrency)
        ]
        await asyncio.sleep(3)
        load.phase = "steady"
        await asyncio.sleep(args.steady_seconds)
        production, previous = first, second
        rss: dict[str, float] = {}
        for swap in range(1, args.swaps + 1):
            load.phase = "swaps"
            production, previous = previous, production
            await asyncio.to_thread(write_route, store, production, previous)
            written = time.monotonic()
            lags.append(await load.wait_for(production, written) - written)
            await asyncio.sleep(args.swap_interval)
            if swap == 1:
                load.phase = "settle"
                await asyncio.sleep(2)
                rss["after_1_swap"] = rss_mb(pid)
        load.phase = "settle"
        await asyncio.sleep(2)
        rss[f"after_{args.swaps}_swaps"] = rss_mb(pid)
        load.stop = True
        await asyncio.gather(*clients)
    store.close()

    def ms(phase: str) -> np.ndarray:
        return np.array([(e - s) * 1000 for p, s, e, _ in load.records if p == phase])

    steady, swaps = ms("steady"), ms("swaps")
    p99_steady = float(np.percentile(steady, 99))
    p99_swaps = float(np.percentile(swaps, 99))
    return {
        "versions": [first, second],
        "swaps": args.swaps,
        "swap_interval_s": args.swap_interval,
        "concurrency": args.concurrency,
        "requests": len(load.records),
        "failures": len(load.failures),
        "failure_examples": load.failures[:3],
        "requests_during_swaps": int(swaps.size),
        "lag_ms_p50": round(float(np.median(lags)) * 1000, 1),
        "lag_ms_max": round(max(lags) * 1000, 1),
        "p50_ms_steady": round(float(np.median(steady)), 2),
        "p99_ms_steady": round(p99_steady, 2),
        "p50_ms_during_swaps": round(float(np.median(swaps)), 2),
        "p99_ms_during_swaps": round(p99_swaps, 2),
        "p99_ratio_swaps_over_steady": round(p99_swaps / p99_steady, 2),
        "rss_mb": {k: round(v, 1) for k, v in rss.items()},
    }


def copy_with_two_versions(artifacts: Path, tmp: Path, seed: int) -> Path:
    """A private copy of ``artifacts`` under ``tmp`` holding at least two ranker versions (a
    second is trained with ``seed`` when the world has one), so a run can swap between them."""
    root = tmp / "artifacts"
    shutil.copytree(artifacts, root, ignore=shutil.ignore_patterns("exposures"))
    if len(versions(root / "models" / NAME)) < 2:
        print("training a second ranker version ...", file=sys.stderr, flush=True)
        store = open_store("", root)
        try:
            ModelRegistry(ArtifactRoot(root), store).train(NAME, seed=seed)
        finally:
            store.close()
    return root


def delete_prefix(url: str, prefix: str) -> None:
    """Delete every Redis key under ``prefix`` (a benchmark's own control documents)."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--control", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--swaps", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--steady-seconds", type=float, default=20.0)
    parser.add_argument("--swap-interval", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=8, help="seed of the second version")
    args = parser.parse_args()
    args.prefix = f"bench-swap-{uuid.uuid4().hex[:8]}:"

    with tempfile.TemporaryDirectory(prefix="bench-swap-") as tmp:
        root = copy_with_two_versions(args.artifacts, Path(tmp), args.seed)
        port, metrics_port = free_port(), free_port()
        cmd = [
            sys.executable, "-m", "recsys.cli.main", "serve", "--artifacts", str(root),
            "--port", str(port), "--metrics-port", str(metrics_port),
            "--control", args.control, "--control-prefix", args.prefix,
        ]  # fmt: skip
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            asyncio.run(wait_serving_for(f"127.0.0.1:{port}", 300))
            result = asyncio.run(storm(args, root, server.pid, f"127.0.0.1:{port}"))
        finally:
            server.terminate()
            server.wait(timeout=60)
            if args.control.startswith("redis"):
                delete_prefix(args.control, args.prefix)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
