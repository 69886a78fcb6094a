"""Recommend latency and server CPU per request at low load, against a real `recsys serve`.

Starts the server as a subprocess on free ports, waits for health SERVING, sends warm-up calls,
then ``--requests`` calls with ``--concurrency`` in flight over one channel (a mix of known
users, some with a location, and a few unknown users), and reports client-side p50/p99 and the
server's CPU time (user + system, from /proc) divided by the number of calls.

    python -m benchmarks.bench_latency --artifacts artifacts [--requests 2000] [--concurrency 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.serving.front import Backend, FrontError, FrontSettings, start_front
from recsys.v1 import recommender_pb2, recommender_pb2_grpc
from recsys.world import load_world

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pinned(cpus: str | None, cmd: list[str]) -> list[str]:
    """``cmd`` run on the CPUs listed (``taskset -c`` syntax, e.g. ``0`` or ``0,1``); None: any."""
    return ["taskset", "-c", cpus, *cmd] if cpus else cmd


def front_bounds(text: str) -> FrontSettings:
    """``IN_FLIGHT/QUEUE_MS[/QUEUED][:BALANCE]``: the admission front's bounds and how it
    balances (``user``, the default, or ``leastconn``), as a benchmark's ``--front`` gives them
    (ports are placeholders, filled in per run)."""
    bounds, colon, balance = text.partition(":")
    in_flight, _, rest = bounds.partition("/")
    queue_ms, _, queued = rest.partition("/")
    try:
        return FrontSettings(
            "127.0.0.1",
            1,
            (Backend("127.0.0.1", 1),),
            int(in_flight),
            int(queue_ms),
            int(queued or 0),
            balance=balance if colon else "user",
        )
    except (ValueError, FrontError) as e:
        raise argparse.ArgumentTypeError(
            f"--front {text!r}: expected IN_FLIGHT/QUEUE_MS[/QUEUED][:BALANCE], e.g. 32/4 or "
            f"32/4:leastconn ({e})"
        ) from e


def start_bench_front(
    bounds: FrontSettings, backends: tuple[Backend, ...], config_dir: Path, cpus: str | None
) -> tuple[subprocess.Popen[bytes], str]:
    """The admission front with ``bounds`` (:func:`front_bounds`) before ``backends``, on a free
    port, pinned like the servers (``cpus``); returns the process and the target to call."""
    settings = replace(bounds, listen_port=free_port(), backends=backends)
    process = start_front(settings, config_dir, prefix=pinned(cpus, []))
    return process, f"127.0.0.1:{settings.listen_port}"


def stat_cpu(stat: Path) -> tuple[str, float]:
    """The name and user + system CPU seconds in a /proc stat file (fields 2, 14 and 15): a
    process's (/proc/PID/stat) or one of its threads' (/proc/PID/task/TID/stat)."""
    text = stat.read_text()
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return name, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, from /proc/<pid>/stat."""
    return stat_cpu(Path(f"/proc/{pid}/stat"))[1]


def make_requests(artifacts: Path, n: int, seed: int) -> list[recommender_pb2.RecommendRequest]:
    world_dir = sorted((artifacts / "world").iterdir(), key=lambda p: p.stat().st_mtime)[-1]
    world = load_world(world_dir)
    rng = np.random.default_rng(seed)
    users = world.users.user_ids[rng.integers(0, world.users.n_users, size=n)]
    requests = []
    for i, user in enumerate(users):
        req = recommender_pb2.RecommendRequest(user_id=str(user), num_results=20)
        if i % 10 == 9:
            req.user_id = f"new-user-{i}"
        if i % 2:
            row = rng.integers(0, world.users.n_users)
            req.location.lat = float(world.users.home_lat[row])
            req.location.lon = float(world.users.home_lon[row])
        requests.append(req)
    return requests


async def wait_serving(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)


async def wait_serving_for(target: str, seconds: float) -> None:
    async with asyncio.timeout(seconds):
        await wait_serving(target)


async def drive(
    target: str, requests: list[recommender_pb2.RecommendRequest], concurrency: int
) -> list[float]:
    latencies: list[float] = []
    queue = list(reversed(requests))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)

        async def worker() -> None:
            while queue:
                req = queue.pop()
                start = time.perf_counter()
                await stub.Recommend(req, timeout=10)
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--serve-arg", action="append", default=[], help="extra serve flag")
    args = parser.parse_args()

    port, metrics_port = free_port(), free_port()
    target = f"127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "recsys.cli.main", "serve", "--artifacts", str(args.artifacts),
        "--port", str(port), "--metrics-port", str(metrics_port), *args.serve_arg,
    ]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        asyncio.run(wait_serving_for(target, 300))
        requests = make_requests(args.artifacts, args.warmup + args.requests, args.seed)
        asyncio.run(drive(target, requests[: args.warmup], args.concurrency))
        cpu_before, wall_before = cpu_seconds(server.pid), time.perf_counter()
        latencies = asyncio.run(drive(target, requests[args.warmup :], args.concurrency))
        wall = time.perf_counter() - wall_before
        cpu = cpu_seconds(server.pid) - cpu_before
    finally:
        server.terminate()
        server.wait(timeout=30)
    ms = np.array(latencies) * 1000
    result = {
        "requests": len(latencies),
        "concurrency": args.concurrency,
        "requests_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "server_cpu_us_per_request": round(cpu / len(latencies) * 1e6, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
