"""A load generator in its own process, so the load it makes is not paid for by the process that
measures the server, and it can be pinned apart from the server (``taskset``).

Closed loop (``--clients N``: N callers, each sending its next call when the last answers) or
open loop (``--rate R``: calls sent on a fixed schedule whatever the answers, so an overloaded
server cannot slow the offered load down). Prints one JSON object: status codes, latency of
answered calls (open loop: from the scheduled send time, so a late send is not hidden), how
long sheds (RESOURCE_EXHAUSTED) took from their actual send, and how late the generator itself
sent (``send_lag``: if it is large, the generator, not the server, is the bottleneck).

    python -m benchmarks.load_generator --target 127.0.0.1:50051 --artifacts ART --rate 900
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
import uvloop

from benchmarks.bench_latency import make_requests
from recsys.v1 import recommender_pb2, recommender_pb2_grpc

SHED = "RESOURCE_EXHAUSTED"
CHANNELS = 4


def ms(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(np.array(values) * 1000, q)), 2) if values else None


class Tally:
    def __init__(self) -> None:
        self.codes: dict[str, int] = {}
        self.details: dict[str, str] = {}
        self.answered: list[float] = []
        self.shed: list[float] = []
        self.failed: list[float] = []
        """Other codes (CANCELLED, DEADLINE_EXCEEDED, ...), from the actual send."""
        self.send_lag: list[float] = []

    def add(self, code: str, details: str, latency: float, from_send: float) -> None:
        self.codes[code] = self.codes.get(code, 0) + 1
        if code != "OK":
            self.details.setdefault(code, details)
        if code == "OK":
            self.answered.append(latency)
        elif code == SHED:
            self.shed.append(from_send)
        else:
            self.failed.append(from_send)

    def summary(self, seconds: float) -> dict[str, object]:
        calls = sum(self.codes.values())
        return {
            "calls": calls,
            "codes": self.codes,
            "details": self.details,
            "answered_per_s": round(len(self.answered) / seconds, 1),
            "answered_p50_ms": ms(self.answered, 50),
            "answered_p99_ms": ms(self.answered, 99),
            "shed_share": round(len(self.shed) / calls, 3) if calls else None,
            "shed_p50_ms": ms(self.shed, 50),
            "shed_p99_ms": ms(self.shed, 99),
            "failed_p50_ms": ms(self.failed, 50),
            "failed_p99_ms": ms(self.failed, 99),
            "send_lag_p50_ms": ms(self.send_lag, 50),
            "send_lag_p99_ms": ms(self.send_lag, 99),
        }


async def call(
    stub: recommender_pb2_grpc.RecommenderAsyncStub, request: recommender_pb2.RecommendRequest
) -> tuple[str, str]:
    try:
        await stub.Recommend(request, timeout=10)
    except grpc.aio.AioRpcError as e:
        return str(e.code().name), e.details() or ""
    return "OK", ""


async def closed_loop(
    stubs: Sequence[recommender_pb2_grpc.RecommenderAsyncStub],
    requests: Sequence[recommender_pb2.RecommendRequest],
    clients: int,
    seconds: float,
) -> Tally:
    tally = Tally()
    end = time.perf_counter() + seconds

    async def client(n: int) -> None:
        k = n
        while time.perf_counter() < end:
            start = time.perf_counter()
            code, details = await call(stubs[n % len(stubs)], requests[k % len(requests)])
            k += clients
            took = time.perf_counter() - start
            tally.add(code, details, took, took)

    await asyncio.gather(*(client(n) for n in range(clients)))
    return tally


async def open_loop(
    stubs: Sequence[recommender_pb2_grpc.RecommenderAsyncStub],
    requests: Sequence[recommender_pb2.RecommendRequest],
    rate: float,
    seconds: float,
) -> Tally:
    tally = Tally()
    start = time.perf_counter()

    async def one(n: int, due: float) -> None:
        sent = time.perf_counter()
        tally.send_lag.append(sent - due)
        code, details = await call(stubs[n % len(stubs)], requests[n % len(requests)])
        now = time.perf_counter()
        tally.add(code, details, now - due, now - sent)

    tasks = []
    loop = asyncio.get_running_loop()
    for n in range(int(rate * seconds)):
        due = start + n / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(n, due)))
    await asyncio.gather(*tasks)
    return tally


async def generate(args: argparse.Namespace) -> dict[str, object]:
    requests = make_requests(args.artifacts, 5000, seed=args.seed)
    channels = [grpc.aio.insecure_channel(args.target) for _ in range(CHANNELS)]
    stubs = [recommender_pb2_grpc.RecommenderStub(c) for c in channels]
    try:
        if args.rate:
            tally = await open_loop(stubs, requests, args.rate, args.seconds)
        else:
            tally = await closed_loop(stubs, requests, args.clients, args.seconds)
    finally:
        for c in channels:
            await c.close(None)
    return tally.summary(args.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=1, help="closed loop: callers")
    parser.add_argument("--rate", type=float, default=0.0, help="open loop: calls per second")
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(uvloop.run(generate(args))))


if __name__ == "__main__":
    main()
