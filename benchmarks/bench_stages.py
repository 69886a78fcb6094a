"""What each stage of the request path costs, in-process, on a built world.

Loads the serving snapshot of ``--artifacts`` (as a server does), then runs ``--requests``
known users with a location through the per-request stages and, in batches of ``--batch``, the
batched stages, timing each stage by wall time, as the server's stage metric does (process CPU
time would charge the search threads' spin-waiting to whichever stage runs next), and the bare
loop (``run_stages`` over a stage that does nothing) alone. Prints one JSON line: µs per request
for each stage and for the loop, and the process's CPU per request over all stages (FAISS's own
threads included, which wall time per stage does not show).

``--places one`` (the default) puts every request at one place, so a batch's queries share one
delivery cell and one FAISS call; ``--places homes`` puts each at its user's home give or take
~1 km, as the throughput benchmark's traffic is, so a batch makes about one call per request.
``--search-threads`` is the FAISS thread count of the thread running the stages, as a server's
batch thread sets it (``recsys serve --search-threads``; 0: FAISS's default, every core).

    python -m benchmarks.bench_stages --artifacts artifacts [--requests 2000] [--batch 4]
        [--places homes] [--search-threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_rank_cut import load_state
from recsys.pipeline.snapshot import ServingSnapshot
from recsys.pipeline.stages import build_stages
from recsys.retrieval.index import set_search_threads
from recsys.stage import Batch, run_stages
from recsys.types import Location, Request


class Nothing:
    name = "nothing"

    def run(self, batch: Batch, snapshot: ServingSnapshot) -> Batch:
        return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--candidates-share", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--places", choices=("one", "homes"), default="one")
    parser.add_argument("--search-threads", type=int, default=1)
    args = parser.parse_args()
    if args.search_threads:
        set_search_threads(args.search_threads)
    snapshot = load_state(args.artifacts)
    requests = make_requests(snapshot, args.requests, args.places)
    plan = build_stages(args.candidates_share)
    cpu: dict[str, list[float]] = {s.name: [] for s in (*plan.per_request, *plan.batched)}
    cpu["loop"] = []
    monitor_min = 0.0  # the monitor stage, fastest of 5 runs of each batch (last round)
    process_cpu: list[float] = []
    for round_ in range(args.rounds + 1):  # the first round warms up and is not counted
        spent = dict.fromkeys(cpu, 0.0)
        process_spent = 0.0
        for start in range(0, len(requests), args.batch):
            batch = Batch(requests=tuple(requests[start : start + args.batch]))
            c = time.process_time()
            for stage in (*plan.per_request, *plan.batched):
                t = time.perf_counter()
                batch = stage.run(batch, snapshot)
                spent[stage.name] += time.perf_counter() - t
            process_spent += time.process_time() - c
            t = time.perf_counter()
            run_stages((Nothing(),), batch, snapshot)
            spent["loop"] += time.perf_counter() - t
            if round_ == args.rounds:  # preemption only lengthens a run: the minimum is the cost
                monitor = plan.batched[-1]
                runs = []
                for _repeat in range(5):
                    t = time.perf_counter()
                    monitor.run(batch, snapshot)
                    runs.append(time.perf_counter() - t)
                monitor_min += min(runs)
        for name, seconds in spent.items():
            cpu[name].append(seconds / len(requests) * 1e6)
        process_cpu.append(process_spent / len(requests) * 1e6)
    print(
        json.dumps(
            {
                "us_per_request_median": {
                    name: round(sorted(v[1:])[len(v[1:]) // 2], 1) for name, v in cpu.items()
                },
                **monitor_cost(cpu, [s.name for s in plan.batched]),
                "process_cpu_us_per_request_median": round(
                    sorted(process_cpu[1:])[len(process_cpu[1:]) // 2], 1
                ),
                "monitor_us_min_of_5": round(monitor_min / len(requests) * 1e6, 1),
                "requests": len(requests),
                "batch": args.batch,
                "places": args.places,
                "search_threads": args.search_threads,
                "load": [round(x, 2) for x in os.getloadavg()],
            }
        )
    )


def make_requests(snapshot: ServingSnapshot, n: int, places: str) -> list[Request]:
    """``n`` known users' requests: all at one place, or each near its user's home."""
    tables = snapshot.tables
    users = [str(u) for u in tables.user_ids[:n]]
    if places == "one":
        return [Request(f"r{i}", u, 20, Location(52.52, 13.40)) for i, u in enumerate(users)]
    rng = np.random.default_rng(3)
    lat = np.asarray(tables.user_home_lat[: len(users)]) + rng.normal(0, 0.01, len(users))
    lon = np.asarray(tables.user_home_lon[: len(users)]) + rng.normal(0, 0.01, len(users))
    return [
        Request(f"r{i}", u, 20, Location(float(a), float(o)))
        for i, (u, a, o) in enumerate(zip(users, lat.tolist(), lon.tolist(), strict=True))
    ]


def monitor_cost(cpu: dict[str, list[float]], batched: list[str]) -> dict[str, float]:
    """The batched path per request without the monitor stage (before) and with it (after),
    from the same rounds: the sum of each round's batched stages, median over rounds."""
    rounds = range(1, len(cpu["loop"]))
    before = sorted(sum(cpu[n][r] for n in batched if n != "monitor") for r in rounds)
    after = sorted(sum(cpu[n][r] for n in batched) for r in rounds)
    b, a = before[len(before) // 2], after[len(after) // 2]
    return {
        "batched_us_without_monitor": round(b, 1),
        "batched_us_with_monitor": round(a, 1),
        "with_over_without": round(a / b, 4),
    }


if __name__ == "__main__":
    main()
