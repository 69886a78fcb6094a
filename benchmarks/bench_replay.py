"""Replay a mixed run: every logged request reproduced by the snapshot that served it?

Serves a private copy of an artifact root in this process (a real gRPC server on a loopback
port), drives it with ``--concurrency`` calls in flight over known and unknown users, with and
without locations, while a control loop changes what serves every ``--change-every`` requests:
a promotion of a second model version and the rollback, an experiment ramp and its undo, an
availability switch off and on. Then it stops the server (which flushes the exposure log),
samples ``--replays`` records and replays each one (``recsys replay``'s code path), and prints
how many reproduced exactly and within tolerance, the snapshots seen, and the replay time.

    python -m benchmarks.bench_replay --artifacts artifacts [--requests 1500] [--replays 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from recsys.artifacts import ArtifactRoot
from recsys.control.backends import open_store
from recsys.control.store import DocumentStore
from recsys.pipeline.archive import snapshot_directory
from recsys.ranking.registry import ModelRegistry
from recsys.replay import LoggedRequest, Replayer, iter_records
from recsys.serving.pipeline import open_pipeline
from recsys.serving.server import RunningServer
from recsys.settings import ServeSettings
from recsys.v1 import recommender_pb2, recommender_pb2_grpc

NAME = "ranker"


def _change(store: DocumentStore, registry: ModelRegistry, step: int, versions: list[str]) -> str:
    """The control-plane change number ``step`` of the run (each is undone by a later one)."""
    kind = step % 3
    if kind == 0:  # promote the other version (a rollback of the previous promotion, every 2nd)
        route = registry.routing()[0].models[NAME]
        target = versions[1] if route.production == versions[0] else versions[0]
        registry.promote(NAME, target)
        return f"promote {target}"
    if kind == 1:  # ramp an experiment's share of its layer up, or back down
        doc = store.read("experiments")
        assert doc is not None
        body = json.loads(json.dumps(doc.body))
        experiment = body["layers"][-1]["experiments"][0]
        wide = experiment["buckets"] == [[0, 10_000]]
        experiment["buckets"] = [[0, 3_000]] if wide else [[0, 10_000]]
        store.write("experiments", body, expected_version=doc.version, author="bench")
        return f"ramp {experiment['name']} to {experiment['buckets']}"
    doc = store.read("availability")
    assert doc is not None
    off = [] if doc.body.get("restaurants_off") else [1, 2, 3, 5, 8, 13]
    store.write(
        "availability",
        {"skus_off": [], "restaurants_off": off},
        expected_version=doc.version,
        author="bench",
    )
    return f"availability restaurants_off={off}"


async def drive(
    settings: ServeSettings, requests: int, concurrency: int, change_every: int, seed: int
) -> dict[str, Any]:
    store = open_store("", settings.artifacts)
    registry = ModelRegistry(ArtifactRoot(settings.artifacts), store)
    versions = [registry.routing()[0].models[NAME].production]
    versions.append(registry.train(NAME, seed=seed + 101))
    server = await RunningServer.start(settings, open_pipeline)
    rng = random.Random(seed)
    sent = 0
    codes: dict[str, int] = {}
    snapshots: set[str] = set()
    changes: list[str] = []
    try:
        await server.wait_ready()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = recommender_pb2_grpc.RecommenderStub(channel)

            async def one() -> None:
                nonlocal sent
                while sent < requests:
                    sent += 1
                    if sent % change_every == 0:
                        changes.append(
                            await asyncio.to_thread(
                                _change, store, registry, len(changes), versions
                            )
                        )
                    user = (
                        f"user-{rng.randrange(10_000):07d}"
                        if rng.random() > 0.05
                        else f"new-{rng.randrange(10**9)}"
                    )
                    located = rng.random() < 0.7
                    request = recommender_pb2.RecommendRequest(
                        user_id=user,
                        num_results=20,
                        surface="home" if rng.random() < 0.8 else "near-me",
                        location=recommender_pb2.Location(
                            lat=52.52 + rng.uniform(-0.1, 0.1), lon=13.4 + rng.uniform(-0.15, 0.15)
                        )
                        if located
                        else None,
                    )
                    try:
                        reply = await stub.Recommend(request, timeout=30)
                        snapshots.add(reply.snapshot_id)
                        codes["OK"] = codes.get("OK", 0) + 1
                    except grpc.aio.AioRpcError as e:
                        codes[e.code().name] = codes.get(e.code().name, 0) + 1

            await asyncio.gather(*(one() for _ in range(concurrency)))
    finally:
        await server.stop()
        store.close()
    return {"codes": codes, "snapshots_served": len(snapshots), "changes": changes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--replays", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--change-every", type=int, default=150)
    parser.add_argument("--candidates-share", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-replay-"))
    try:
        root = work / "artifacts"
        shutil.copytree(args.artifacts, root, ignore=shutil.ignore_patterns("exposures"))
        exposures = work / "exposures"
        settings = ServeSettings(
            artifacts=root,
            port=0,
            metrics_port=0,
            control_poll_seconds=0.05,
            drain_seconds=5,
            exposure_dir=exposures,
            exposure_candidates_share=args.candidates_share,
        )
        run = asyncio.run(
            drive(settings, args.requests, args.concurrency, args.change_every, args.seed)
        )
        records = list(iter_records(exposures))
        chosen = random.Random(args.seed).sample(records, min(args.replays, len(records)))
        replayer = Replayer(root, snapshot_directory(exposures))
        start = time.perf_counter()
        reproduced = exact = 0
        failures: list[str] = []
        for record in chosen:
            replayed = replayer.replay(LoggedRequest.parse(record))
            reproduced += replayed.reproduced
            exact += replayed.exact
            if not replayed.reproduced and len(failures) < 5:
                failures.append(record["request_id"])
        seconds = time.perf_counter() - start
        print(
            json.dumps(
                {
                    **run,
                    "load": os.getloadavg(),
                    "records": len(records),
                    "replayed": len(chosen),
                    "reproduced": reproduced,
                    "exact": exact,
                    "snapshots_replayed": len({r["snapshot_id"] for r in chosen}),
                    "replay_ms_per_request": round(seconds / max(len(chosen), 1) * 1000, 2),
                    "not_reproduced_examples": failures,
                }
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
