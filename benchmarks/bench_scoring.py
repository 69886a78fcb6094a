"""Scoring cost per row: LightGBM (num_threads=1) against the lleaves-compiled model.

Loads the production ranker of an artifact root, builds real feature rows the way serving does
(users, candidate items, places, hours), checks that both engines give the same scores, then
times ``predict`` on batches of 1, 100 and 500 rows. Each figure is the median over
``--repeats`` rounds of the thread CPU time per row (CPU time: the machine is shared, and wall
time would count other processes' turns). Compile time is reported for inlined and non-inlined
code; the binary goes to a temporary directory, the artifact root is not modified.

    python -m benchmarks.bench_scoring --artifacts /tmp/art100 [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from recsys.artifacts import ArtifactRoot
from recsys.control.backends import open_store
from recsys.ranking import compiled as compiled_module
from recsys.ranking.features import assemble_features, load_feature_tables
from recsys.ranking.model import RankingModel, load_model_version
from recsys.ranking.routing import parse_routing
from recsys.world import load_world

SIZES = (1, 100, 500)


def served_rows(root: ArtifactRoot, index_version: str, n: int) -> np.ndarray:
    lineage = root.lineage(index_version)
    world = load_world(lineage.world_dir)
    tables = load_feature_tables(lineage.features_dir, world.catalogue)
    rng = np.random.default_rng(0)
    return assemble_features(
        tables,
        rng.integers(0, tables.n_users, n).astype(np.int32),
        rng.integers(0, world.catalogue.n_items, n),
        rng.uniform(world.meta.center_lat - 0.1, world.meta.center_lat + 0.1, n),
        rng.uniform(world.meta.center_lon - 0.1, world.meta.center_lon + 0.1, n),
        rng.integers(0, 24, n).astype(np.int8),
    )


def cpu_us_per_row(model: RankingModel, rows: np.ndarray, repeats: int) -> float:
    calls = max(20, 20_000 // rows.shape[0])
    rounds = []
    for _ in range(repeats):
        model.predict(rows)
        start = time.thread_time()
        for _ in range(calls):
            model.predict(rows)
        rounds.append((time.thread_time() - start) / calls / rows.shape[0] * 1e6)
    return float(statistics.median(rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    root = ArtifactRoot(args.artifacts)
    store = open_store("", args.artifacts)
    try:
        document = store.read("routing")
    finally:
        store.close()
    if document is None:
        raise SystemExit(f"{args.artifacts}: no routing document")
    routing = parse_routing(document.body)
    version = routing.models["ranker"].production
    model = load_model_version(root, "ranker", version)
    rows = served_rows(root, routing.index_version, 5000)

    report: dict[str, Any] = {
        "model": version,
        "trees": model.booster.num_trees(),
        "libraries": compiled_module.library_versions(),
    }
    engines: dict[str, RankingModel] = {"lightgbm": model}
    for inline in (False, True):
        with tempfile.TemporaryDirectory() as cache:
            compiled_module.COMPILE_FLAGS["finline"] = inline
            start = time.process_time()
            # a private root: compiled code is loaded only from a tree nobody else can write
            fast = model.with_compiled(Path(cache) / "compiled")
            report[f"compile_cpu_s.finline={inline}"] = round(time.process_time() - start, 2)
            difference = float(np.abs(fast.predict(rows) - model.predict(rows)).max())
            report[f"max_abs_difference.finline={inline}"] = difference
            engines[f"lleaves.finline={inline}"] = fast
            # the engine keeps its code in memory: the temporary directory can go
    for name, engine in engines.items():
        report[f"us_per_row.{name}"] = {
            str(n): round(cpu_us_per_row(engine, rows[:n], args.repeats), 3) for n in SIZES
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
