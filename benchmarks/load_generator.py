"""A load generator in its own process, so the load it makes is not paid for by the process that
measures the server, and it can be pinned apart from the server (``taskset``).

Closed loop (``--clients N``: N callers, each sending its next call when the last answers) or
open loop (``--rate R``: calls sent on a fixed schedule whatever the answers, so an overloaded
server cannot slow the offered load down). Prints one JSON object: status codes, latency of
answered calls (open loop: from the scheduled send time, so a late send is not hidden), how
long sheds (RESOURCE_EXHAUSTED) took from their actual send, and how late the generator itself
sent (``send_lag``: if it is large, the generator, not the server, is the bottleneck).

``--native`` sends the same calls from benchmarks/loadgen/loadgen.cc (gRPC's C++ library, built
here on first use with g++ into benchmarks/loadgen/build/) instead of this process's event loop.
On one core, the Python loop offers ~2,300 calls/s with a send lag p99 of ~1 ms but falls behind
by tens of ms at ~4,000/s, where the native generator's send lag p99 stays under 1 ms
(benchmarks/README.md, "The admission front, measured by a native load generator"): at those
rates the Python figures measure the generator, not the server.

    python -m benchmarks.load_generator --target 127.0.0.1:50051 --artifacts ART --rate 900
        [--native]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import uvloop

from benchmarks.bench_latency import make_requests
from recsys.serving.routing import USER_HEADER, user_metadata
from recsys.v1 import recommender_pb2, recommender_pb2_grpc

SHED = "RESOURCE_EXHAUSTED"
CHANNELS = 4
NATIVE_SOURCE = Path(__file__).parent / "loadgen" / "loadgen.cc"
NATIVE_BINARY = Path(__file__).parent / "loadgen" / "build" / "loadgen"


def ms(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(np.array(values) * 1000, q)), 2) if values else None


WINDOW_SECONDS = 0.25
"""The timeline's window: calls grouped by when they were due (open loop) or sent."""
STALL_FACTOR = 4.0
"""A window whose answered calls' p50 is this many times the whole run's is a stalled one."""


def timeline(
    answered: Sequence[float], answered_at: Sequence[float], not_ok_at: Sequence[float]
) -> dict[str, object] | None:
    """The run in :data:`WINDOW_SECONDS` windows by when each call was due: the slowest window
    (the highest p50 of its answered calls: when it began, that p50, its longest call, and its
    calls not answered OK) and how many windows' p50 was over :data:`STALL_FACTOR` times the
    run's. A stall of the server shows as a run of such windows, which the run's p99 alone
    does not tell from a tail spread evenly. None without the due times (the Python generator's
    closed loop keeps none)."""
    if not answered or len(answered_at) != len(answered):
        return None
    latency = np.asarray(answered, dtype=np.float64) * 1000
    window = (np.asarray(answered_at, dtype=np.float64) // WINDOW_SECONDS).astype(np.int64)
    refused = np.bincount(
        (np.asarray(not_ok_at, dtype=np.float64) // WINDOW_SECONDS).astype(np.int64),
        minlength=int(window.max()) + 1,
    )
    order = np.argsort(window, kind="stable")
    ordered = window[order]
    starts = np.flatnonzero(np.diff(ordered, prepend=-1))
    groups = np.split(latency[order], starts[1:])
    p50s = np.array([np.median(g) for g in groups])
    slowest = int(np.argmax(p50s))
    at = int(ordered[starts[slowest]])
    return {
        "slowest_window": {
            "at_s": round(at * WINDOW_SECONDS, 2),
            "p50_ms": round(float(p50s[slowest]), 2),
            "max_ms": round(float(groups[slowest].max()), 2),
            "not_ok": int(refused[at]),  # refused has a count for every answered window
        },
        "stalled_windows": int((p50s > STALL_FACTOR * np.median(latency)).sum()),
        "windows": len(groups),
    }


class Tally:
    def __init__(self) -> None:
        self.codes: dict[str, int] = {}
        self.details: dict[str, str] = {}
        self.answered: list[float] = []
        self.shed: list[float] = []
        self.failed: list[float] = []
        """Other codes (CANCELLED, DEADLINE_EXCEEDED, ...), from the actual send."""
        self.send_lag: list[float] = []
        self.answered_at: list[float] = []
        """When each answered call was due (open loop) or sent, in seconds from the start."""
        self.not_ok_at: list[float] = []
        """The same for every call not answered OK."""

    def add(self, code: str, details: str, latency: float, from_send: float, at: float) -> None:
        self.codes[code] = self.codes.get(code, 0) + 1
        if code != "OK":
            self.details.setdefault(code, details)
            self.not_ok_at.append(at)
        if code == "OK":
            self.answered.append(latency)
            self.answered_at.append(at)
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
            "timeline": timeline(self.answered, self.answered_at, self.not_ok_at),
        }


async def call(
    stub: recommender_pb2_grpc.RecommenderAsyncStub, request: recommender_pb2.RecommendRequest
) -> tuple[str, str]:
    try:
        await stub.Recommend(request, timeout=10, metadata=user_metadata(request.user_id))
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
    began = time.perf_counter()
    end = began + seconds

    async def client(n: int) -> None:
        k = n
        while time.perf_counter() < end:
            start = time.perf_counter()
            code, details = await call(stubs[n % len(stubs)], requests[k % len(requests)])
            k += clients
            took = time.perf_counter() - start
            tally.add(code, details, took, took, start - began)

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
        tally.add(code, details, now - due, now - sent, due - start)

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


def build_native() -> Path:
    """The native generator's binary, compiled from its source when missing or older."""
    if NATIVE_BINARY.exists() and NATIVE_BINARY.stat().st_mtime >= NATIVE_SOURCE.stat().st_mtime:
        return NATIVE_BINARY
    flags = None
    if shutil.which("pkg-config"):
        flags = subprocess.run(
            ["pkg-config", "--cflags", "--libs", "grpc++"], capture_output=True, text=True
        )
    if shutil.which("g++") is None or flags is None or flags.returncode != 0:
        raise RuntimeError(
            "the native load generator needs g++, pkg-config and gRPC's C++ library "
            "(Debian: apt-get install g++ pkg-config libgrpc++-dev)"
        )
    NATIVE_BINARY.parent.mkdir(parents=True, exist_ok=True)
    partial = NATIVE_BINARY.with_name(f"{NATIVE_BINARY.name}.{os.getpid()}")
    subprocess.run(
        ["g++", "-O2", "-std=c++17", "-o", str(partial), str(NATIVE_SOURCE), *flags.stdout.split()],
        check=True,
    )
    partial.replace(NATIVE_BINARY)  # atomic: a concurrent build never runs a half-written file
    return NATIVE_BINARY


def require_native(parser: argparse.ArgumentParser) -> None:
    """Build the native generator before a benchmark starts any server, or end it with one
    line naming ``--generator native`` (a missing compiler or library, a failed build)."""
    try:
        build_native()
    except (RuntimeError, subprocess.CalledProcessError) as e:
        parser.error(f"--generator native: {e} (or run with --generator python)")


def write_requests(path: Path, requests: Sequence[recommender_pb2.RecommendRequest]) -> None:
    """The request file of the native generator: each a 4-byte big-endian length, then bytes."""
    with path.open("wb") as out:
        for request in requests:
            body = request.SerializeToString()
            out.write(struct.pack(">I", len(body)) + body)


def native_tally(raw: dict[str, Any]) -> Tally:
    """The native generator's output (codes, details, latency lists in seconds) as a Tally."""
    tally = Tally()
    tally.codes = {str(k): int(v) for k, v in raw["codes"].items()}
    tally.details = {str(k): str(v) for k, v in raw["details"].items()}
    tally.answered = [float(v) for v in raw["answered"]]
    tally.shed = [float(v) for v in raw["shed"]]
    tally.failed = [float(v) for v in raw["failed"]]
    tally.send_lag = [float(v) for v in raw["send_lag"]]
    tally.answered_at = [float(v) for v in raw["answered_at"]]
    tally.not_ok_at = [float(v) for v in raw["not_ok_at"]]
    return tally


def run_native(
    target: str,
    request_file: Path,
    seconds: float,
    *,
    rate: float | None = None,
    clients: int | None = None,
    channels: int = CHANNELS,
    first: int = 0,
    user_header: str = USER_HEADER,
) -> Tally:
    """One open-loop (``rate``) or closed-loop (``clients``) run of the native generator over
    the calls of ``request_file`` (:func:`write_requests`), call n sending request ``first + n``
    (modulo the file's length), each with its request's user id as metadata ``user_header``
    (empty: none), as clients send it for the balancers (recsys/serving/routing.py)."""
    if (rate is None) == (clients is None):
        raise ValueError("expected one of rate or clients")
    load = ["--rate", str(rate)] if rate is not None else ["--clients", str(clients)]
    cmd = [
        str(build_native()), "--target", target, "--requests", str(request_file),
        "--seconds", str(seconds), "--channels", str(channels), "--first", str(first), *load,
    ]  # fmt: skip
    if user_header:
        cmd += ["--user-header", user_header]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return native_tally(json.loads(out.stdout))


def generate_native(
    args: argparse.Namespace, requests: Sequence[recommender_pb2.RecommendRequest]
) -> Tally:
    with tempfile.TemporaryDirectory(prefix="loadgen-") as tmp:
        path = Path(tmp) / "requests.bin"
        write_requests(path, requests)
        if args.rate:
            return run_native(args.target, path, args.seconds, rate=args.rate)
        return run_native(args.target, path, args.seconds, clients=args.clients)


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
    parser.add_argument(
        "--native", action="store_true", help="send from the native generator (loadgen.cc)"
    )
    args = parser.parse_args()
    if args.native:
        requests = make_requests(args.artifacts, 5000, seed=args.seed)
        print(json.dumps(generate_native(args, requests).summary(args.seconds)))
    else:
        print(json.dumps(uvloop.run(generate(args))))


if __name__ == "__main__":
    main()
