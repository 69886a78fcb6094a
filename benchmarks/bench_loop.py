"""The whole loop three times on a copy of a built world: a drift that ends promoted, a sabotage
the gates refuse, and the same sabotage forced onto the canary, which the canary must roll back.

Each run is ``recsys loop`` (a real server process, simulated users with a drift scenario, the
monitor, retraining from the logged traffic, the gates, the canary controller) on a fresh copy
of ``--artifacts``; the benchmark prints the three timelines and the figures: time from the
drift's onset to the promotion, the gates' refusal, the time from the forced bad canary's start
to its rollback, failed requests over each run, and production after each run.

    recsys build --out /tmp/w/artifacts --skus 4000 --users 1500 --seed 11 --dim 16
    python -m benchmarks.bench_loop --artifacts /tmp/w/artifacts [--only forced] [-- extra flags]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = {
    "drift": [],
    "sabotage": ["--sabotage"],
    "forced": ["--sabotage", "--force-canary"],
}
"""Each run's `recsys loop` flags beyond the common ones."""


def production(artifacts: Path) -> str:
    body = json.loads((artifacts / "control" / "routing.json").read_text())
    doc = body.get("body", body)
    return str(doc["models"]["ranker"]["production"])


def run(artifacts: Path, work: Path, label: str, extra: list[str]) -> dict[str, object]:
    copy = work / label / "artifacts"
    shutil.copytree(artifacts, copy, ignore=shutil.ignore_patterns("mlflow"))
    before = production(copy)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "recsys.cli", "loop", "--artifacts", str(copy), *extra],
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    seconds = time.perf_counter() - started
    print(f"\n=== {label}: recsys loop {' '.join(extra)} (exit {done.returncode}, {seconds:.0f}s)")
    print(done.stdout.rstrip())
    if done.returncode != 0:
        print(done.stderr[-3000:])
    return {"label": label, "before": before, "after": production(copy), "exit": done.returncode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True, help="a built artifact root")
    parser.add_argument("--scenario", default="taste-shift")
    parser.add_argument(
        "--only", choices=sorted(RUNS), action="append", help="this run only (repeatable)"
    )
    parser.add_argument("extra", nargs="*", help="more `recsys loop` flags (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp:
        work = Path(tmp)
        flags = ["--scenario", args.scenario, *args.extra]
        results = [
            run(args.artifacts, work, label, [*flags, *more])
            for label, more in RUNS.items()
            if not args.only or label in args.only
        ]
    print("\nproduction before -> after")
    for r in results:
        print(f"  {r['label']:9s} {r['before']} -> {r['after']}  (exit {r['exit']})")
    print("load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
