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

``--idle-ms MS`` measures what a batch costs when it follows a pause, as at a moderate rate,
where a batch thread sleeps between batches while the event loop, gRPC's threads and other
processes run on its core. Each round runs the batched stages over every request twice, back to
back and with the thread asleep MS before each batch (the order alternating by round), and
reports the thread's own CPU (``time.thread_time()`` around each batch: the scheduler's clock,
not ``getrusage``, whose tick sampling misses a thread that wakes on a tick and sleeps again
before the next) and each stage's wall time, per request, medians over the rounds, with the
ratio of the two.

``--loop-thread BUSY_US/IDLE_US`` measures what sharing the interpreter lock costs the batched
stages. In a server the batch thread shares the lock with the event loop, which holds it while
it runs Python (gRPC's callbacks, the servicer) and lets it go while it waits for the network.
A second thread here does the same: it runs Python for BUSY_US, sleeps IDLE_US, and again. Each
round then runs the batched stages over every request twice, alone and beside that thread (the
order alternating by round), and the report gives the batch thread's own CPU (user and system,
``getrusage(RUSAGE_THREAD)``), its voluntary context switches and the wall time, per request,
medians over the rounds, and the share of the wall time the second thread spent in its busy
turns.

``--arrange-paths`` compares the arrange stage's two ways over the same ranked batches: each
request on its own (what batches of up to ``ONE_BY_ONE_UP_TO`` requests take) against one pass
over the batch (what larger ones take), in turn, checking that both serve the same items, and
reports each one's wall time per request, medians over the rounds, and their ratio.

    python -m benchmarks.bench_stages --artifacts artifacts [--requests 2000] [--batch 4]
        [--places homes] [--search-threads 1] [--loop-thread 200/200] [--idle-ms 8]
        [--arrange-paths]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from benchmarks.bench_rank_cut import load_state
from recsys.pipeline.arrange import Arrange
from recsys.pipeline.snapshot import ServingSnapshot
from recsys.pipeline.stages import StagePlan, build_stages
from recsys.retrieval.index import set_search_threads
from recsys.stage import Batch, Stage, run_stages
from recsys.types import Location, Request

S = TypeVar("S")


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
    parser.add_argument(
        "--loop-thread",
        type=loop_thread_duty,
        metavar="BUSY_US/IDLE_US",
        help="also run the batched stages beside a thread that holds the interpreter lock for "
        "BUSY_US and sleeps IDLE_US, in turn, as an event loop serving calls does",
    )
    parser.add_argument(
        "--idle-ms",
        type=idle_ms,
        metavar="MS",
        help="also run the batched stages with the thread asleep MS before each batch, as "
        "between batches at a moderate rate, against back to back",
    )
    parser.add_argument(
        "--arrange-paths",
        action="store_true",
        help="also time the arrange stage request by request against one pass over the batch",
    )
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
    contention = (
        {}
        if args.loop_thread is None
        else {
            "loop_thread": beside_a_loop_thread(
                plan.batched, snapshot, requests, args.batch, args.rounds, args.loop_thread
            )
        }
    )
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
                **contention,
                **(
                    {
                        "arrange_paths": arrange_paths(
                            plan, snapshot, requests, args.batch, args.rounds
                        )
                    }
                    if args.arrange_paths
                    else {}
                ),
                **(
                    {}
                    if args.idle_ms is None
                    else {
                        "idle": after_a_pause(
                            plan.batched, snapshot, requests, args.batch, args.rounds, args.idle_ms
                        )
                    }
                ),
                "load": [round(x, 2) for x in os.getloadavg()],
            }
        )
    )


def idle_ms(text: str) -> float:
    """``--idle-ms``: milliseconds > 0 -> seconds."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected milliseconds > 0 (e.g. 8)")
    return value / 1000


def alternating(rounds: int) -> Iterator[tuple[int, bool]]:
    """(round, second run?) for one warm-up round and ``rounds`` more, each round's two runs in
    turn: the first run first in even rounds, the second first in odd ones."""
    for round_ in range(rounds + 1):
        for second in (False, True) if round_ % 2 == 0 else (True, False):
            yield round_, second


def compared(
    runs: dict[str, list[dict[str, float]]], ratios: Sequence[str], digits: int
) -> dict[str, object]:
    """Each of the two runs' figures, medians over rounds (``digits`` decimals), and for each
    key of ``ratios`` the median over rounds of the second run's over the first's, named
    ``KEY_SECOND_over_FIRST``."""
    (first, firsts), (second, seconds) = runs.items()
    report: dict[str, object] = {
        name: {
            key: round(statistics.median(r[key] for r in measured), digits) for key in measured[0]
        }
        for name, measured in runs.items()
    }
    for key in ratios:
        pairs = zip(firsts, seconds, strict=True)
        report[f"{key}_{second}_over_{first}"] = round(
            statistics.median(b[key] / a[key] for a, b in pairs), 3
        )
    return report


def after_a_pause(
    stages: Sequence[Stage[S]],
    snapshot: S,
    requests: Sequence[Request],
    batch_size: int,
    rounds: int,
    pause: float,
) -> dict[str, object]:
    """The batched stages over ``requests``, back to back and with the thread asleep ``pause``
    seconds before each batch, in turn (back to back first in even rounds): per request, the
    thread's CPU and each stage's wall time, medians over ``rounds`` (after one round of each
    to warm up), and the median ratio of the paused run's CPU to the back-to-back one's."""
    runs: dict[str, list[dict[str, float]]] = {"back_to_back": [], "after_a_pause": []}
    for round_, paused in alternating(rounds):
        spent: dict[str, float] = {}
        cpu = 0.0
        for at in range(0, len(requests), batch_size):
            if paused:
                time.sleep(pause)
            start = time.thread_time()
            batch = run_stages(
                stages, Batch(requests=tuple(requests[at : at + batch_size])), snapshot
            )
            cpu += time.thread_time() - start
            for name, seconds in batch.stage_seconds:
                spent[name] = spent.get(name, 0.0) + seconds
        if round_ == 0:
            continue
        n = len(requests)
        runs["after_a_pause" if paused else "back_to_back"].append(
            {"cpu_us": cpu / n * 1e6} | {f"{k}_us": v / n * 1e6 for k, v in spent.items()}
        )
    return {"pause_ms": round(pause * 1000, 3)} | compared(runs, ["cpu_us"], 1)


def arrange_paths(
    plan: StagePlan, snapshot: ServingSnapshot, requests: Sequence[Request], size: int, rounds: int
) -> dict[str, object]:
    """The arrange stage over the same ranked batches, request by request and in one pass over
    each batch, in turn (request by request first in even rounds): wall time per request,
    medians over ``rounds`` (after one round of each to warm up), and the median ratio."""
    before = plan.batched[: [s.name for s in plan.batched].index("arrange")]
    ranked = [
        run_stages(before, Batch(requests=tuple(requests[at : at + size])), snapshot)
        for at in range(0, len(requests), size)
    ]
    ways = {"one_by_one": Arrange(one_by_one_up_to=size), "batch": Arrange(one_by_one_up_to=0)}
    for batch in ranked:
        one, other = (way.run(batch, snapshot).served_positions for way in ways.values())
        if not all(np.array_equal(a, b) for a, b in zip(one, other, strict=True)):
            raise SystemExit("arrange: the two ways served different items")
    runs: dict[str, list[dict[str, float]]] = {"one_by_one": [], "batch": []}
    for round_, second in alternating(rounds):
        name = "batch" if second else "one_by_one"
        start = time.perf_counter()
        for batch in ranked:
            ways[name].run(batch, snapshot)
        if round_:
            runs[name].append({"wall_us": (time.perf_counter() - start) / len(requests) * 1e6})
    return compared(runs, ["wall_us"], 1)


def loop_thread_duty(text: str) -> tuple[float, float]:
    """``BUSY_US/IDLE_US`` -> (busy, idle) in seconds; busy > 0, idle >= 0."""
    busy, sep, idle = text.partition("/")
    try:
        duty = (float(busy) * 1e-6, float(idle) * 1e-6)
    except ValueError:
        duty = (0.0, -1.0)
    if not sep or not duty[0] > 0 or not duty[1] >= 0:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected BUSY_US/IDLE_US, microseconds, busy > 0 and idle >= 0 "
            "(e.g. 200/200)"
        )
    return duty


class LoopThread:
    """A thread that runs Python for ``busy`` seconds (holding the interpreter lock, or waiting
    for it when the switch interval made it give the lock up), then sleeps ``idle`` seconds (the
    lock released), until stopped; ``held`` sums its finished busy turns."""

    def __init__(self, busy: float, idle: float) -> None:
        self._busy, self._idle = busy, idle
        self._stop = threading.Event()
        self._turning = threading.Event()
        self.held = 0.0
        self._thread = threading.Thread(target=self._run, name="loop-thread", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            until = start + self._busy
            while time.perf_counter() < until:
                pass
            self.held += time.perf_counter() - start
            self._turning.set()
            time.sleep(self._idle)

    def __enter__(self) -> LoopThread:
        self._thread.start()
        self._turning.wait()  # measured from its first finished turn on, not before it runs
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def beside_a_loop_thread(
    stages: Sequence[Stage[ServingSnapshot]],
    snapshot: ServingSnapshot,
    requests: Sequence[Request],
    batch_size: int,
    rounds: int,
    duty: tuple[float, float],
) -> dict[str, object]:
    """The batched stages over ``requests``, alone and beside a :class:`LoopThread`, in turn
    (alone first in even rounds): per request, the running thread's CPU, voluntary context
    switches and wall time, medians over ``rounds`` (after one round of each to warm up)."""
    runs: dict[str, list[dict[str, float]]] = {"alone": [], "beside": []}
    held: list[float] = []
    for round_, beside in alternating(rounds):
        with LoopThread(*duty) if beside else contextlib.nullcontext() as loop:
            held_before = loop.held if loop is not None else 0.0
            start = resource.getrusage(resource.RUSAGE_THREAD)
            began = time.perf_counter()
            for at in range(0, len(requests), batch_size):
                batch = Batch(requests=tuple(requests[at : at + batch_size]))
                run_stages(stages, batch, snapshot)
            wall = time.perf_counter() - began
            end = resource.getrusage(resource.RUSAGE_THREAD)
            held_during = (loop.held if loop is not None else 0.0) - held_before
        if round_ == 0:
            continue
        n = len(requests)
        cpu = end.ru_utime - start.ru_utime + end.ru_stime - start.ru_stime
        runs["beside" if beside else "alone"].append(
            {
                "cpu_us": cpu / n * 1e6,
                "system_us": (end.ru_stime - start.ru_stime) / n * 1e6,
                "switches": (end.ru_nvcsw - start.ru_nvcsw) / n,
                "wall_us": wall / n * 1e6,
            }
        )
        if beside:
            held.append(held_during / wall)
    return {
        "busy_us": round(duty[0] * 1e6, 1),
        "idle_us": round(duty[1] * 1e6, 1),
        "loop_busy_share": round(statistics.median(held), 3),
    } | compared(runs, ["cpu_us", "wall_us"], 2)


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
