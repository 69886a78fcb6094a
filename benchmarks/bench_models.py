"""Many ranking models at once: one model against 24 versions routed across surfaces and arms.

The product serves more than twenty ranking model versions at the same time (surfaces such as
the home feed, "near me" and promotions, each with production, canary and experiment-arm
versions). This benchmark stands up that situation on a built world:

- trains further versions of the ranker until a private copy of ``--artifacts`` holds
  ``--versions`` (seeds 101, 102, ... after the built one; the registry's own ``train``:
  registered, validated, compiled);
- loads them all through the serving model cache in a fresh process and reports the RSS each
  version after the first adds (the compiled library, the booster, the golden rows);
- an experiments document (in this benchmark only, not the served default) that routes the
  versions: 3 surfaces x 8 arms each pinning one version (``model_version`` per arm); every
  request of a batch lands in a random (surface, arm) cell, so a batch splits across up to 24
  versions as it would in production;
- in process (the default): runs the batched stages over batches of ``--batch`` requests,
  alternating rounds where every request is pinned to one version and rounds where the batch
  splits over all versions (same users, same candidates), and reports CPU per request, the
  batch wall-time p50/p99 and each batched stage's wall time per request of each;
- ``--monitor``: the monitor stage alone, ``Monitor.run`` over the same batches of one version
  and split over the versions, CPU per request; with ``--monitor-baseline CHECKOUT`` also that
  checkout's monitor stage (checked to report the same counts), old and new in one run;
- ``--served``: starts a real `recsys serve` on the copy (result cache off, so every call runs
  the ranker) and alternates two experiments documents on it, published to its control store
  like any change: ``one`` (every arm pins the production version) and ``many`` (the 3 x 8 arms
  pin all the versions). Each request goes to the surface on which its user is in an arm, so
  every call is routed by an arm and the arms get users evenly. Per document and round: a
  warm-up, the capacity (closed loop, ``--concurrency`` in flight), then an open loop at 70% of
  the one-version capacity (the median of ``--calibrate`` closed loops before the rounds; the
  same rate for both documents): p50/p99, the server's CPU per call, share of a core and
  runqueue wait, and the versions the answers name.

    python -m benchmarks.bench_models --artifacts /tmp/art20k [--versions 24] [--batch 16]
    python -m benchmarks.bench_models --artifacts /tmp/art20k --served [--seconds 10] [--rounds 3]
    python -m benchmarks.bench_models --artifacts /tmp/art20k --monitor [--monitor-baseline ../main]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks.bench_latency import free_port
from benchmarks.bench_rank_cut import load_state
from benchmarks.bench_throughput import (
    RequestStream,
    children_cpu,
    closed_loop,
    make_requests,
    open_loop,
    percentiles,
    stop,
    wait_answering,
)
from recsys.artifacts import ArtifactRoot
from recsys.control.backends import open_store
from recsys.control.store import EXPERIMENTS
from recsys.experiments.assignment import RequestAttributes, compile_config
from recsys.experiments.config import DEFAULT_NUM_BUCKETS, SCHEMA_VERSION
from recsys.monitoring.baseline import BaselineCache
from recsys.monitoring.stage import Monitor
from recsys.pipeline.snapshot import ServingSnapshot
from recsys.pipeline.stages import build_stages
from recsys.ranking.model_cache import ModelCache
from recsys.ranking.registry import ModelRegistry
from recsys.serving.pipeline import Job, recommend_batch
from recsys.stage import Batch, Stage, run_stages
from recsys.types import Assignment, Location, PipelineParams, Request
from recsys.v1 import recommender_pb2, recommender_pb2_grpc

SURFACES = ("home", "near_me", "promotions")
ARMS_PER_SURFACE = 8
MODEL_LAYER = "models"


def experiments_document(versions: Sequence[str]) -> dict[str, Any]:
    """The routing this benchmark serves (in this benchmark only, not the served default).

    One layer (``model_version`` may be set in one layer only) with one experiment per surface,
    targeted at it; running experiments of a layer own disjoint buckets, so each owns a third of
    them. Each has ``ARMS_PER_SURFACE`` equal arms; arm n of the 24 pins
    ``versions[n % len(versions)]``. Given one version, every arm pins it: the same assignment
    work and exposures, one model. The salts do not depend on the versions, so a user lands in
    the same (surface, arm) under either document.
    """
    share = DEFAULT_NUM_BUCKETS // len(SURFACES)
    experiments = []
    for s, surface in enumerate(SURFACES):
        end = DEFAULT_NUM_BUCKETS if s == len(SURFACES) - 1 else (s + 1) * share
        arms = [
            {
                "name": f"arm-{a}",
                "weight": 1,
                "params": {"model_version": versions[(s * ARMS_PER_SURFACE + a) % len(versions)]},
            }
            for a in range(ARMS_PER_SURFACE)
        ]
        experiments.append(
            {
                "name": f"models-{surface}",
                "status": "running",
                "epoch": 0,
                "buckets": [[s * share, end]],
                "targeting": {"surfaces": [surface]},
                "arms": arms,
            }
        )
    return {
        "schema": SCHEMA_VERSION,
        "num_buckets": DEFAULT_NUM_BUCKETS,
        "layers": [{"name": MODEL_LAYER, "salt": MODEL_LAYER, "experiments": experiments}],
    }


def cell_versions(document: Mapping[str, Any]) -> dict[str, str]:
    """``surface/arm`` -> the version that cell pins."""
    [layer] = document["layers"]
    return {
        f"{exp['targeting']['surfaces'][0]}/{arm['name']}": arm["params"]["model_version"]
        for exp in layer["experiments"]
        for arm in exp["arms"]
    }


def surface_of_users(document: Mapping[str, Any], user_ids: Iterable[str]) -> dict[str, str]:
    """The surface on which each user falls into an arm (the one whose experiment owns the
    user's bucket), by the serving assignment code. Sending each user on that surface puts
    every request in an arm, and the arms get users evenly (by hash)."""
    assigner = compile_config(document)
    found: dict[str, str] = {}
    for user in user_ids:
        for surface in SURFACES:
            attributes = RequestAttributes(surface=surface, has_location=True)
            if assigner.assign(user, attributes).exposures:
                found[user] = surface
                break
    return found


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def loaded_version_mb(artifacts: Path, versions: list[str]) -> float:
    """RSS each version adds when a fresh process loads them one after another through the
    serving model cache (in this process they are loaded already, by training's validation)."""
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from benchmarks.bench_models import rss_mb\n"
        "from recsys.artifacts import ArtifactRoot\n"
        "from recsys.ranking.model_cache import ModelCache\n"
        "cache = ModelCache(ArtifactRoot(Path(sys.argv[1])))\n"
        "cache.get('ranker', sys.argv[2])\n"
        "before = rss_mb()\n"
        "for v in sys.argv[3:]:\n"
        "    cache.get('ranker', v)\n"
        "print(json.dumps((rss_mb() - before) / max(1, len(sys.argv) - 3)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(artifacts), *versions],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def production_version(artifacts: Path) -> str:
    store = open_store("", artifacts)
    try:
        return (
            ModelRegistry(ArtifactRoot(artifacts), store).routing()[0].models["ranker"].production
        )
    finally:
        store.close()


def publish(artifacts: Path, document: Mapping[str, Any]) -> int:
    """Write ``document`` as the experiments document of ``artifacts``' control store."""
    store = open_store("", artifacts)
    try:
        current = store.read(EXPERIMENTS)
        expected = current.version if current is not None else 0
        return store.write(EXPERIMENTS, document, expected_version=expected, author="bench").version
    finally:
        store.close()


async def wait_config(target: str, version: int, seconds: float) -> None:
    """Until the server answers with experiments document ``version`` (it polls the store)."""
    request = recommender_pb2.RecommendRequest(user_id="warm-up", num_results=20)
    async with asyncio.timeout(seconds), grpc.aio.insecure_channel(target) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        while True:
            if (await stub.Recommend(request, timeout=10)).config_version == str(version):
                return
            await asyncio.sleep(0.2)


def served_requests(
    artifacts: Path, document: Mapping[str, Any], n: int, seed: int
) -> list[recommender_pb2.RecommendRequest]:
    """Distinct requests of known users (located near home), each on the surface where the
    user is in an arm, so every request is routed by an arm of ``document``."""
    requests = make_requests(artifacts, n, seed, "distinct")
    surfaces = surface_of_users(document, {r.user_id for r in requests})
    for request in requests:
        request.surface = surfaces[request.user_id]
    return requests


def count_version(seen: Counter[str], response: recommender_pb2.RecommendResponse) -> None:
    seen[response.model_version] += 1


def runqueue_wait_seconds(pid: int) -> float:
    """How long the threads of ``pid`` have waited, runnable, for a CPU (/proc schedstat): the
    time the machine, not the process, kept it from running."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just exited
            total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


def server_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


SUMMARY_FIELDS = (
    "capacity_per_s",
    "closed_cpu_us_per_call",
    "p50_ms",
    "p99_ms",
    "open_cpu_us_per_call",
    "open_server_runqueue_wait",
    "load_open",
)


def served_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per document, the median over rounds of each figure (a round the machine starved the
    server of CPU moves a median less than a mean), and the 24-version p99 over one's."""
    medians = {
        config: {
            field: round(float(np.median([r[field] for r in rows if r["config"] == config])), 2)
            for field in SUMMARY_FIELDS
        }
        for config in ("one", "many")
    }
    return {
        "median_over_rounds": medians,
        "many_vs_one_p99": round(medians["many"]["p99_ms"] / medians["one"]["p99_ms"], 2),
        "many_vs_one_cpu_per_call_open": round(
            medians["many"]["open_cpu_us_per_call"] / medians["one"]["open_cpu_us_per_call"], 3
        ),
        "versions_served_many": sorted(
            {r["versions_served"] for r in rows if r["config"] == "many"}
        ),
    }


def one_version_capacity(
    args: argparse.Namespace, target: str, requests: Sequence[recommender_pb2.RecommendRequest]
) -> float:
    """The median of ``--calibrate`` closed loops (half a phase each) on the one-version
    document the server starts with: on a shared machine one sample of the capacity can be far
    from the next, and an open loop at 70% of a lucky sample is an overload."""
    asyncio.run(closed_loop(target, RequestStream(requests), args.concurrency, args.warmup))
    samples = []
    for _ in range(args.calibrate):
        start = time.perf_counter()
        latencies, _ = asyncio.run(
            closed_loop(target, RequestStream(requests), args.concurrency, args.seconds / 2)
        )
        samples.append(len(latencies) / (time.perf_counter() - start))
    capacity = float(np.median(samples))
    print(
        json.dumps(
            {
                "calibration_per_s": [round(x, 1) for x in samples],
                "open_rate": round(0.7 * capacity, 1),
                "load": os.getloadavg()[0],
            }
        ),
        flush=True,
    )
    return capacity


def measure_served(
    args: argparse.Namespace, artifacts: Path, versions: list[str], production: str
) -> None:
    """A real `recsys serve` (result cache off: every call runs the ranker) on the private copy,
    one configuration at a time by publishing its experiments document: ``one`` (every arm
    pins production) and ``many`` (the arms pin all the versions). Per configuration and round:
    a warm-up, capacity (closed loop), then an open loop at ``--rate`` or 70% of the calibrated
    one-version capacity (the same rate for both), server CPU per call and the versions the
    answers name."""
    documents = {"one": experiments_document([production]), "many": experiments_document(versions)}
    requests = served_requests(artifacts, documents["many"], args.requests, args.seed)
    port = free_port()
    target = f"127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "recsys.cli.main", "serve", "--artifacts", str(artifacts),
        "--port", str(port), "--metrics-port", str(free_port()), "--cache-entries", "0",
    ]  # fmt: skip
    publish(artifacts, documents["one"])
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows: list[dict[str, Any]] = []
    try:
        asyncio.run(wait_answering(target, 600))
        rate = args.rate or 0.7 * one_version_capacity(args, target, requests)
        for round_ in range(args.rounds):
            for name, document in documents.items():
                asyncio.run(wait_config(target, publish(artifacts, document), 120))
                asyncio.run(
                    closed_loop(target, RequestStream(requests), args.concurrency, args.warmup)
                )
                seen: Counter[str] = Counter()
                count = functools.partial(count_version, seen)
                wait0 = runqueue_wait_seconds(process.pid)
                cpu0, wall0 = children_cpu(process.pid), time.perf_counter()
                latencies, codes = asyncio.run(
                    closed_loop(
                        target, RequestStream(requests), args.concurrency, args.seconds, count
                    )
                )
                capacity = len(latencies) / (time.perf_counter() - wall0)
                cpu_closed = children_cpu(process.pid) - cpu0
                # The share of a core the server got: on a shared machine a low capacity with a
                # low share is the machine's doing, not the server's.
                cores_closed = cpu_closed / (time.perf_counter() - wall0)
                waited_closed = (runqueue_wait_seconds(process.pid) - wait0) / (
                    time.perf_counter() - wall0
                )
                load_closed = os.getloadavg()[0]
                wait0 = runqueue_wait_seconds(process.pid)
                cpu0, wall0 = children_cpu(process.pid), time.perf_counter()
                open_latencies, open_codes, _ = asyncio.run(
                    open_loop(target, RequestStream(requests), rate, args.seconds, count)
                )
                cpu_open = children_cpu(process.pid) - cpu0
                cores_open = cpu_open / (time.perf_counter() - wall0)
                waited_open = (runqueue_wait_seconds(process.pid) - wait0) / (
                    time.perf_counter() - wall0
                )
                row = {
                    "round": round_,
                    "config": name,
                    "capacity_per_s": round(capacity, 1),
                    "closed_cpu_us_per_call": round(cpu_closed / max(len(latencies), 1) * 1e6),
                    "closed_server_cores": round(cores_closed, 2),
                    "closed_server_runqueue_wait": round(waited_closed, 2),
                    "closed_codes": codes,
                    "load_closed": round(load_closed, 2),
                    "open_rate": round(rate, 1),
                    **percentiles(open_latencies),
                    "open_cpu_us_per_call": round(cpu_open / max(len(open_latencies), 1) * 1e6),
                    "open_server_cores": round(cores_open, 2),
                    "open_server_runqueue_wait": round(waited_open, 2),
                    "open_codes": open_codes,
                    "load_open": round(os.getloadavg()[0], 2),
                    "versions_served": len(seen),
                    "calls_per_version_min_max": [min(seen.values()), max(seen.values())],
                    "server_rss_mb": round(server_rss_mb(process.pid), 1),
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
        print(json.dumps(served_summary(rows)), flush=True)
    finally:
        stop(process)


def in_process_snapshot(artifacts: Path, versions: list[str]) -> ServingSnapshot:
    """The built world's snapshot with every version loaded and its baseline compiled."""
    root = ArtifactRoot(artifacts)
    snapshot = load_state(artifacts)
    cache = ModelCache(root)
    models = {**snapshot.models, **{v: cache.get("ranker", v) for v in versions}}
    # Every version's training baseline, as a server compiles them: without it the monitor stage
    # skips the versions it has none for, and the split batches would look cheaper than served.
    return replace(snapshot, models=models, baselines=BaselineCache().for_models(models))


def make_jobs(
    snapshot: ServingSnapshot,
    rng: np.random.Generator,
    versions: Sequence[str],
    users: np.ndarray,
) -> list[Job]:
    """A job per user row (known users at home), each pinned to a random one of ``versions``."""
    tables = snapshot.tables
    out = []
    for n, row in enumerate(users.tolist()):
        params = PipelineParams(model_version=versions[int(rng.integers(len(versions)))])
        home = Location(float(tables.user_home_lat[row]), float(tables.user_home_lon[row]))
        request = Request(f"r{n}", str(tables.user_ids[row]), 20, home)
        out.append(Job(request, Assignment((), params, "1"), snapshot))
    return out


def known_users(snapshot: ServingSnapshot) -> np.ndarray:
    return np.flatnonzero(np.abs(np.asarray(snapshot.tables.user_vectors)).sum(axis=1) > 0)


def measure_in_process(
    args: argparse.Namespace, artifacts: Path, versions: list[str], document: Mapping[str, Any]
) -> None:
    """The batched stages in this process: one version against batches split over the cells.
    Beside the CPU, each batched stage's wall time per request (the stage timings the batch
    carries), so the rank and monitor stages' shares show."""
    snapshot = in_process_snapshot(artifacts, versions)
    stages = build_stages().batched
    rng = np.random.default_rng(args.seed)
    known = known_users(snapshot)
    choices = {"one": [versions[0]], "split": list(cell_versions(document).values())}
    results: dict[str, dict[str, list[float]]] = {
        k: {"cpu": [], "wall": []} for k in ("one", "split")
    }
    stage_us: dict[str, dict[str, list[float]]] = {k: {} for k in choices}
    for round_ in range(args.rounds + 1):  # the first round warms up
        for name, cells in choices.items():
            batches = [
                make_jobs(snapshot, rng, cells, rng.choice(known, size=args.batch))
                for _ in range(args.batches)
            ]
            spent_by_stage: Counter[str] = Counter()
            cpu = time.process_time()
            for batch in batches:
                t = time.perf_counter()
                first = recommend_batch(batch, stages)[0]
                if round_:
                    results[name]["wall"].append(time.perf_counter() - t)
                    assert not isinstance(first, Exception)
                    spent_by_stage.update(dict(first.stage_seconds))
            if round_:
                spent = time.process_time() - cpu
                results[name]["cpu"].append(spent / (args.batches * args.batch) * 1e6)
                for stage, seconds in spent_by_stage.items():
                    per_request = seconds / (args.batches * args.batch) * 1e6
                    stage_us[name].setdefault(stage, []).append(per_request)
    cpu_median = {name: round(float(np.median(r["cpu"])), 1) for name, r in results.items()}
    summary = {
        name: {
            "cpu_us_per_request_median": cpu_median[name],
            "batch_wall_p50_ms": round(float(np.percentile(r["wall"], 50)) * 1e3, 2),
            "batch_wall_p99_ms": round(float(np.percentile(r["wall"], 99)) * 1e3, 2),
            "stage_wall_us_per_request_median": {
                stage: round(float(np.median(us)), 1) for stage, us in stage_us[name].items()
            },
        }
        for name, r in results.items()
    }
    ratio = cpu_median["split"] / cpu_median["one"]
    print(
        json.dumps(
            {
                "batch": args.batch,
                **summary,
                "split_vs_one_cpu": round(ratio, 3),
                "load_after": os.getloadavg(),
            }
        ),
        flush=True,
    )


def stage_module(checkout: Path) -> Any:
    """The monitor stage module of another checkout (e.g. main's, as the baseline), loaded
    beside this one's; it bins with this checkout's ``recsys.monitoring.baseline``."""
    path = checkout / "recsys" / "monitoring" / "stage.py"
    spec = importlib.util.spec_from_file_location("baseline_monitor_stage", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--monitor-baseline: no monitor stage at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure_monitor(
    args: argparse.Namespace, artifacts: Path, versions: list[str], document: Mapping[str, Any]
) -> None:
    """The monitor stage alone: the batched stages before it run once over ``--batches``
    batches of one version and as many split over the cells; then, per round, ``Monitor.run``
    (this checkout's, and ``--monitor-baseline``'s if given, checked to report the same counts)
    over each set ``--repeat`` times, CPU per request; median of the rounds."""
    snapshot = in_process_snapshot(artifacts, versions)
    before = [s for s in build_stages().batched if s.name != Monitor.name]
    rng = np.random.default_rng(args.seed)
    known = known_users(snapshot)
    choices = {"one": [versions[0]], "split": list(cell_versions(document).values())}
    batches: dict[str, list[Batch]] = {}
    for name, cells in choices.items():
        batches[name] = []
        for _ in range(args.batches):
            jobs = make_jobs(snapshot, rng, cells, rng.choice(known, size=args.batch))
            batch = Batch(
                requests=tuple(j.request for j in jobs),
                deadlines=tuple(j.deadline for j in jobs),
                assignments=tuple(j.assignment for j in jobs if j.assignment is not None),
            )
            batches[name].append(run_stages(before, batch, snapshot))
    monitors: dict[str, Stage[ServingSnapshot]] = {"new": Monitor()}
    if args.monitor_baseline:
        monitors["old"] = stage_module(args.monitor_baseline).Monitor()
        for batch in (*batches["one"], *batches["split"]):
            new = monitors["new"].run(batch, snapshot).drift_counts
            old = monitors["old"].run(batch, snapshot).drift_counts
            assert [c[:3] for c in new] == [c[:3] for c in old]
            assert all(np.array_equal(a[3], b[3]) for a, b in zip(new, old, strict=True))
    cpu: dict[str, list[float]] = {}
    for round_ in range(args.rounds + 1):  # the first round warms up
        for code, monitor in monitors.items():
            for name, sample in batches.items():
                start = time.process_time()
                for _ in range(args.repeat):
                    for batch in sample:
                        monitor.run(batch, snapshot)
                spent = time.process_time() - start
                if round_:
                    per_request = spent / (args.repeat * len(sample) * args.batch) * 1e6
                    cpu.setdefault(f"{code}_{name}", []).append(per_request)
    medians = {key: round(float(np.median(us)), 2) for key, us in cpu.items()}
    print(
        json.dumps(
            {
                "batch": args.batch,
                "versions_per_split_batch": round(
                    float(np.mean([len(set(b.model_versions)) for b in batches["split"]])), 1
                ),
                "monitor_cpu_us_per_request_median": medians,
                "rounds": {key: [round(x, 2) for x in us] for key, us in cpu.items()},
                "load_after": os.getloadavg(),
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--versions", type=int, default=24)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=60, help="batches per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--served", action="store_true", help="against a real `recsys serve` (see above)"
    )
    parser.add_argument(
        "--monitor", action="store_true", help="the monitor stage alone, 1 vs 24 (see above)"
    )
    parser.add_argument(
        "--monitor-baseline",
        type=Path,
        help="--monitor: also time the monitor stage of this checkout (e.g. main's)",
    )
    parser.add_argument("--repeat", type=int, default=20, help="--monitor: runs of each batch")
    parser.add_argument("--seconds", type=float, default=10.0, help="--served: each phase")
    parser.add_argument("--warmup", type=float, default=3.0, help="--served: seconds")
    parser.add_argument("--concurrency", type=int, default=16, help="--served: closed loop")
    parser.add_argument("--requests", type=int, default=20_000, help="--served: the stream")
    parser.add_argument(
        "--calibrate",
        type=int,
        default=3,
        help="--served: closed loops whose median one-version capacity sets the open loop's rate",
    )
    parser.add_argument(
        "--rate", type=float, help="--served: the open loop's calls/s (default: 70%% of capacity)"
    )
    args = parser.parse_args()
    print(json.dumps({"load_before": os.getloadavg()}), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        artifacts = Path(tmp) / "artifacts"
        shutil.copytree(args.artifacts, artifacts, ignore=shutil.ignore_patterns("exposures"))
        root = ArtifactRoot(artifacts)
        store = open_store("", artifacts)
        registry = ModelRegistry(root, store)
        start = time.perf_counter()
        present = len(root.model_versions().get("ranker", ()))
        for n in range(present, args.versions):  # a root that holds them already trains none
            registry.train("ranker", seed=100 + n)
        train_s = time.perf_counter() - start
        store.close()
        versions = sorted(root.model_versions()["ranker"])
        per_version_mb = loaded_version_mb(artifacts, versions)
        document = experiments_document(versions)
        print(
            json.dumps(
                {
                    "versions": len(versions),
                    "train_s": round(train_s, 1),
                    "load_after_training": os.getloadavg(),
                    "rss_mb_per_added_version": round(per_version_mb, 1),
                    "peak_rss_mb": round(
                        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
                    ),
                    "experiments": cell_versions(document),
                }
            ),
            flush=True,
        )
        if args.served:
            measure_served(args, artifacts, versions, production_version(artifacts))
        elif args.monitor:
            measure_monitor(args, artifacts, versions, document)
        else:
            measure_in_process(args, artifacts, versions, document)


if __name__ == "__main__":
    main()
