"""Assignment cost with many layers and experiments: µs per request, as a table.

    .venv/bin/python benchmarks/bench_assignment.py [--layers 100] [--experiments 1200]

A synthetic document (experiments/synthetic.py): the experiments spread evenly over the layers,
each layer's experiments splitting ``coverage`` of its buckets between them, 2 or 3 arms each, a
tenth of them targeted, the first four layers turning real pipeline parameters. Rows: the first
``--experiments`` count at each coverage (the work grows with the exposures per request, one
object each), then the other counts at one coverage (it does not grow with the experiments).
Users are distinct ids, so nothing is cached. Each figure is the best and the median of
``--repeats`` runs of ``--requests`` requests (the best is the least disturbed by other work);
CPU time (``time.thread_time``) is the cost of the requests themselves, wall time also counts
the time other processes held the core, so on a shared machine compare CPU figures.
"""

from __future__ import annotations

import argparse
import statistics
import time

from recsys.experiments.assignment import Assigner, RequestAttributes, compile_config
from recsys.experiments.synthetic import synthetic_config


def time_single(
    assigner: Assigner, users: list[str], attributes: RequestAttributes
) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per request of :meth:`Assigner.assign`."""
    cpu, wall = time.thread_time(), time.perf_counter()
    for u in users:
        assigner.assign(u, attributes)
    return (time.thread_time() - cpu) / len(users), (time.perf_counter() - wall) / len(users)


def time_batched(
    assigner: Assigner, users: list[str], attributes: RequestAttributes, batch: int
) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per request of :meth:`Assigner.assign_many`."""
    attrs = [attributes] * batch
    cpu, wall = time.thread_time(), time.perf_counter()
    for i in range(0, len(users), batch):
        chunk = users[i : i + batch]
        assigner.assign_many(chunk, attrs[: len(chunk)])
    return (time.thread_time() - cpu) / len(users), (time.perf_counter() - wall) / len(users)


def _best_median(seconds: list[float]) -> str:
    return f"{min(seconds) * 1e6:.1f} / {statistics.median(seconds) * 1e6:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=100)
    parser.add_argument("--experiments", type=int, nargs="*", default=[1200, 120, 12_000])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--coverage", type=float, nargs="*", default=[0.25, 0.5, 0.75, 1.0])
    args = parser.parse_args()
    attributes = RequestAttributes(surface="home", platform="ios", has_location=True)
    print(
        f"{args.layers} layers, {args.requests} distinct users x {args.repeats} runs; "
        f"µs per request, best run / median run; CPU = this thread's CPU time (what a request "
        f"costs, whatever else the machine runs), wall = elapsed; batched = assign_many over "
        f"{args.batch}"
    )
    header = (
        f"{'experiments':>11} {'coverage':>8} {'exposures/req':>13} {'compile ms':>10} "
        f"{'assign CPU':>13} {'assign wall':>13} {'batched CPU':>13}"
    )
    print(header)
    print("-" * len(header))
    # the first experiment count at every coverage, the others at the middle coverage: the
    # cost follows the exposures per request, not the number of experiments
    rows = [(args.experiments[0], c) for c in args.coverage]
    middle = args.coverage[len(args.coverage) // 2 - 1] if len(args.coverage) > 1 else 0.5
    rows += [(n, middle) for n in args.experiments[1:]]
    for n_experiments, coverage in rows:
        doc = synthetic_config(args.layers, n_experiments, coverage)
        start = time.perf_counter()
        assigner = compile_config(doc, version="1")
        compile_ms = (time.perf_counter() - start) * 1e3
        single_cpu, single_wall, batch_cpu = [], [], []
        for r in range(args.repeats):
            users = [f"user-{r}-{n}" for n in range(args.requests)]
            cpu, wall = time_single(assigner, users, attributes)
            single_cpu.append(cpu)
            single_wall.append(wall)
            batch_cpu.append(time_batched(assigner, users, attributes, args.batch)[0])
        sample = [f"user-x-{n}" for n in range(1000)]
        exposures = statistics.mean(len(assigner.assign(u, attributes).exposures) for u in sample)
        print(
            f"{n_experiments:>11} {coverage:>8.0%} {exposures:>13.1f} {compile_ms:>10.1f} "
            f"{_best_median(single_cpu):>13} {_best_median(single_wall):>13} "
            f"{_best_median(batch_cpu):>13}"
        )


if __name__ == "__main__":
    main()
