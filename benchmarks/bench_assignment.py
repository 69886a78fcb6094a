"""Assignment cost with many layers and experiments: µs per request, as a table.

    .venv/bin/python benchmarks/bench_assignment.py [--layers 100] [--experiments 1200]

A synthetic document: ``--experiments`` spread evenly over ``--layers`` layers, each layer's
experiments splitting ``coverage`` of its buckets between them (rows for several coverages, as the
number of exposures per request, and so the work, grows with it), 2 or 3 arms each, a tenth of
them targeted, the first four layers turning real pipeline parameters. Users are distinct ids, so
nothing is cached. Timings are the median of ``--repeats`` runs of ``--requests`` requests.
"""

from __future__ import annotations

import argparse
import statistics
import time

from experiments.assignment import Assigner, RequestAttributes, compile_config
from experiments.synthetic import synthetic_config


def time_single(assigner: Assigner, users: list[str], attributes: RequestAttributes) -> float:
    start = time.perf_counter()
    for u in users:
        assigner.assign(u, attributes)
    return (time.perf_counter() - start) / len(users)


def time_batched(
    assigner: Assigner, users: list[str], attributes: RequestAttributes, batch: int
) -> float:
    attrs = [attributes] * batch
    start = time.perf_counter()
    for i in range(0, len(users), batch):
        chunk = users[i : i + batch]
        assigner.assign_many(chunk, attrs[: len(chunk)])
    return (time.perf_counter() - start) / len(users)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=100)
    parser.add_argument("--experiments", type=int, default=1200)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--coverage", type=float, nargs="*", default=[0.25, 0.5, 0.75, 1.0])
    args = parser.parse_args()
    attributes = RequestAttributes(surface="home", platform="ios", has_location=True)
    print(
        f"{args.layers} layers, {args.experiments} experiments, {args.requests} distinct users "
        f"x {args.repeats} repeats (median); batch = assign_many over {args.batch} requests"
    )
    header = (
        f"{'coverage':>8} {'exposures/req':>13} {'compile ms':>10} "
        f"{'assign µs/req':>13} {'batched µs/req':>14}"
    )
    print(header)
    print("-" * len(header))
    for coverage in args.coverage:
        doc = synthetic_config(args.layers, args.experiments, coverage)
        start = time.perf_counter()
        assigner = compile_config(doc, version="1")
        compile_ms = (time.perf_counter() - start) * 1e3
        singles, batches = [], []
        for r in range(args.repeats):
            users = [f"user-{r}-{n}" for n in range(args.requests)]
            singles.append(time_single(assigner, users, attributes))
            batches.append(time_batched(assigner, users, attributes, args.batch))
        sample = [f"user-x-{n}" for n in range(1000)]
        exposures = statistics.mean(len(assigner.assign(u, attributes).exposures) for u in sample)
        print(
            f"{coverage:>8.0%} {exposures:>13.1f} {compile_ms:>10.1f} "
            f"{statistics.median(singles) * 1e6:>13.1f} {statistics.median(batches) * 1e6:>14.1f}"
        )


if __name__ == "__main__":
    main()
