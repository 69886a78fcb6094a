"""The servicer's own CPU per cache hit, without gRPC: what the hit path adds to the echo floor.

Opens the real pipeline on a built world (as ``recsys serve`` does, exposure log in a temporary
directory), then calls :meth:`RecommenderService.serve` on one request repeated, each call with
its own request id (1,000 in turn, as in ``bench_throughput``'s hit case), so every call after
the first is a cache hit: validation, the lookup, the response bytes, metrics and the exposure
record, whose lines the writer thread encodes and writes. Process CPU (all threads) per call,
over ``--rounds`` rounds; run it from another checkout (``PYTHONPATH=<checkout>``) to compare
code in one sitting.

    python -m benchmarks.bench_hit_path --artifacts /tmp/hit-art [--calls 10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from benchmarks.bench_throughput import make_requests
from recsys.serving.exposure import ExposureSink, open_exposure_writer
from recsys.serving.metrics import ServingMetrics
from recsys.serving.pipeline import Pipeline, open_pipeline
from recsys.serving.servicer import RecommenderService
from recsys.settings import ServeSettings

WARM_UP_CALLS = 2_000
FLUSH_SECONDS = 0.1
"""After each round, time for the exposure writer to take the round's records (counted)."""


@contextlib.asynccontextmanager
async def open_service(
    settings: ServeSettings,
) -> AsyncIterator[tuple[Pipeline, RecommenderService]]:
    """The real pipeline and servicer, opened as ``recsys serve`` opens them (the exposure log
    written by its thread), without gRPC; closed on the way out."""
    metrics = ServingMetrics()
    pipeline = await open_pipeline(settings, metrics)
    sink = ExposureSink(open_exposure_writer(settings), observer=metrics)
    sink.start()
    service = RecommenderService(metrics, sink)
    service.attach(pipeline)
    try:
        yield pipeline, service
    finally:
        await sink.close()
        await pipeline.close()


async def measure(artifacts: Path, calls: int, rounds: int) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="bench-hit-path-") as exposures:
        settings = ServeSettings(
            artifacts=artifacts, port=0, metrics_port=0, exposure_dir=Path(exposures)
        )
        async with open_service(settings) as (_, service):
            ids = make_requests(artifacts, calls, 0, "hit")  # bench_throughput's hit case
            requests = [ids[i % len(ids)] for i in range(calls)]
            for request in requests[:WARM_UP_CALLS]:
                await service.serve(request, None)
            per_call = []
            for _ in range(rounds):
                start = time.process_time()
                for request in requests:
                    code, details, _response = await service.serve(request, None)
                    if code.name != "OK":
                        raise RuntimeError(f"a hit was answered {code.name}: {details}")
                await asyncio.sleep(FLUSH_SECONDS)
                per_call.append((time.process_time() - start) / calls * 1e6)
            return per_call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    per_call = asyncio.run(measure(args.artifacts, args.calls, args.rounds))
    print(
        json.dumps(
            {
                "servicer_cpu_us_per_hit": [round(us, 1) for us in per_call],
                "load": os.getloadavg(),
            }
        )
    )


if __name__ == "__main__":
    main()
