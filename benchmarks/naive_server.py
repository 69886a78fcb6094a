"""The naive per-request pipeline at reference quality: what the issue measures against.

Each Recommend runs on its own (no micro-batching, no cache, no cut): assign, exact top-500
retrieval (every IVF list probed), all 500 candidates scored by the full model, arrange. The
stages are recsys's own code (serving.pipeline.recommend_batch with a batch of one), in a
thread so the event loop stays free, on uvloop like ``recsys serve``.

    python -m benchmarks.naive_server --artifacts /tmp/art100 --port 50062
"""

from __future__ import annotations

import argparse
import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
import uvloop

from benchmarks.echo_server import serve_until_signal
from recsys.experiments.assignment import RequestAttributes
from recsys.pipeline.snapshot import ServingSnapshot
from recsys.pipeline.stages import build_stages
from recsys.serving.pipeline import Job, recommend_batch
from recsys.serving.servicer import local_hour
from recsys.serving.validation import new_request_id, validate_request
from recsys.serving.wire import to_response
from recsys.v1 import recommender_pb2, recommender_pb2_grpc

REFERENCE_K = 500


class NaiveRecommender(recommender_pb2_grpc.RecommenderServicer):
    def __init__(self, state: ServingSnapshot, threads: int) -> None:
        self._state = state
        self._pool = ThreadPoolExecutor(max_workers=threads)
        self._exact = max(state.index.nlist, 1)
        self._stages = build_stages().batched

    async def Recommend(
        self,
        request: recommender_pb2.RecommendRequest,
        context: grpc.aio.ServicerContext[
            recommender_pb2.RecommendRequest, recommender_pb2.RecommendResponse
        ],
    ) -> recommender_pb2.RecommendResponse:
        valid = validate_request(request, hour=local_hour(), make_request_id=new_request_id)
        state = self._state
        assignment = state.assigner.assign(
            valid.user_id,
            RequestAttributes(valid.surface, valid.platform, valid.location is not None),
        )
        params = replace(assignment.params, retrieval_k=REFERENCE_K, nprobe=self._exact, rank_cut=0)
        job = Job(valid, replace(assignment, params=params), state)
        loop = asyncio.get_running_loop()
        (result,) = await loop.run_in_executor(self._pool, recommend_batch, [job], self._stages)
        if isinstance(result, Exception):
            raise result
        return to_response(result)


async def serve(artifacts: Path, host: str, port: int, threads: int) -> None:
    from benchmarks.bench_rank_cut import load_state

    state = await asyncio.to_thread(load_state, artifacts)
    await serve_until_signal(NaiveRecommender(state, threads), host, port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50062)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    uvloop.run(serve(args.artifacts, args.host, args.port, args.threads))


if __name__ == "__main__":
    main()
