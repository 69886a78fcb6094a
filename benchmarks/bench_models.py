"""Many ranking models at once: one model against 24 versions routed across surfaces and arms.

The product serves more than twenty ranking model versions at the same time (surfaces such as
the home feed, "near me" and promotions, each with production, canary and experiment-arm
versions). This benchmark stands up that situation in-process on a built world:

- trains ``--versions`` - 1 further versions of the ranker (seeds 101, 102, ...; the registry's
  own ``train``: registered, validated, compiled) into a private copy of ``--artifacts``;
- loads them all through the serving model cache in a fresh process and reports the RSS each
  version after the first adds (the compiled library, the booster, the golden rows);
- an experiments document (in this benchmark only, not the served default) that routes the
  versions: 3 surfaces x 8 arms each pinning one version (``model_version`` per arm); every
  request of a batch lands in a random (surface, arm) cell, so a batch splits across up to 24
  versions as it would in production;
- runs the batched stages over batches of ``--batch`` requests, alternating rounds where every
  request is pinned to one version and rounds where the batch splits over all versions (same
  users, same candidates), and reports CPU per request and the batch wall-time p50/p99 of each.

    python -m benchmarks.bench_models --artifacts /tmp/art20k [--versions 24] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.bench_rank_cut import load_state
from recsys.artifacts import ArtifactRoot
from recsys.control.backends import open_store
from recsys.pipeline.stages import build_stages
from recsys.ranking.model_cache import ModelCache
from recsys.ranking.registry import ModelRegistry
from recsys.serving.pipeline import Job, recommend_batch
from recsys.types import Assignment, Location, PipelineParams, Request

SURFACES = ("home", "near_me", "promotions")
ARMS_PER_SURFACE = 8


def experiments_document(versions: list[str]) -> dict[str, str]:
    """Which version each (surface, arm) cell pins: the routing this benchmark serves."""
    cells = [(s, a) for s in SURFACES for a in range(ARMS_PER_SURFACE)]
    return {
        f"{surface}/arm-{arm}": versions[n % len(versions)]
        for n, (surface, arm) in enumerate(cells)
    }


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--versions", type=int, default=24)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=60, help="batches per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps({"load_before": os.getloadavg()}), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        artifacts = Path(tmp) / "artifacts"
        shutil.copytree(args.artifacts, artifacts, ignore=shutil.ignore_patterns("exposures"))
        root = ArtifactRoot(artifacts)
        store = open_store("", artifacts)
        registry = ModelRegistry(root, store)
        start = time.perf_counter()
        for n in range(args.versions - 1):
            registry.train("ranker", seed=101 + n)
        train_s = time.perf_counter() - start
        store.close()
        snapshot = load_state(artifacts)
        base = dict(snapshot.models)
        versions = sorted(root.model_versions()["ranker"])
        per_version_mb = loaded_version_mb(artifacts, versions)
        cache = ModelCache(root)
        cache_models = {version: cache.get("ranker", version) for version in versions}
        snapshot = replace(snapshot, models={**base, **cache_models})
        document = experiments_document(versions)
        print(
            json.dumps(
                {
                    "versions_loaded": len(snapshot.models),
                    "train_s": round(train_s, 1),
                    "rss_mb_per_added_version": round(per_version_mb, 1),
                    "peak_rss_mb": round(
                        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
                    ),
                    "experiments": document,
                }
            ),
            flush=True,
        )
        stages = build_stages().batched
        tables = snapshot.tables
        rng = np.random.default_rng(args.seed)
        known = np.flatnonzero(np.abs(np.asarray(tables.user_vectors)).sum(axis=1) > 0)
        cells = list(document.values())
        one = versions[0]

        def jobs(split: bool, rows: np.ndarray) -> list[Job]:
            out = []
            for n, row in enumerate(rows.tolist()):
                version = cells[int(rng.integers(len(cells)))] if split else one
                params = PipelineParams(model_version=version)
                home = Location(float(tables.user_home_lat[row]), float(tables.user_home_lon[row]))
                request = Request(f"r{n}", str(tables.user_ids[row]), 20, home)
                out.append(Job(request, Assignment((), params, "1"), snapshot))
            return out

        results: dict[str, dict[str, list[float]]] = {
            k: {"cpu": [], "wall": []} for k in ("one", "split")
        }
        for round_ in range(args.rounds + 1):  # the first round warms up
            for split in (False, True):
                name = "split" if split else "one"
                batches = [
                    jobs(split, rng.choice(known, size=args.batch)) for _ in range(args.batches)
                ]
                cpu = time.process_time()
                for batch in batches:
                    t = time.perf_counter()
                    recommend_batch(batch, stages)
                    if round_:
                        results[name]["wall"].append(time.perf_counter() - t)
                if round_:
                    spent = time.process_time() - cpu
                    results[name]["cpu"].append(spent / (args.batches * args.batch) * 1e6)
        summary = {
            name: {
                "cpu_us_per_request_median": round(float(np.median(r["cpu"])), 1),
                "batch_wall_p50_ms": round(float(np.percentile(r["wall"], 50)) * 1e3, 2),
                "batch_wall_p99_ms": round(float(np.percentile(r["wall"], 99)) * 1e3, 2),
            }
            for name, r in results.items()
        }
        ratio = (
            summary["split"]["cpu_us_per_request_median"]
            / summary["one"]["cpu_us_per_request_median"]
        )
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


if __name__ == "__main__":
    main()
