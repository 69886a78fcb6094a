"""Cold start and memory of `recsys serve`: seconds from spawn to health SERVING, then RSS and
PSS of every server process (``/proc/<pid>/smaps_rollup``), with 1 or more workers.

PSS divides each shared page by the number of processes mapping it, so with N workers sharing
the memory-mapped index, tables and world, the PSS sum stays near one copy while the RSS sum
counts the shared pages N times.

    python -m benchmarks.bench_cold_start --artifacts /tmp/art4m [--workers 2] [--evict]

``--evict`` first drops the artifact root's files (only those) from the page cache with
``posix_fadvise(DONTNEED)``, so the start reads them from disk as after a reboot.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bench_latency import free_port, make_requests, wait_serving_for
from recsys.v1 import recommender_pb2_grpc


def rollup_kb(pid: int) -> dict[str, int]:
    """Rss, Pss, Shared_Clean ... (kB) from /proc/<pid>/smaps_rollup."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        out[name.strip()] = int(value.split()[0])
    return out


def process_tree(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(p for c in children for p in process_tree(int(c)))]


def evict(root: Path) -> int:
    """Drop ``root``'s files from the page cache; returns the bytes advised."""
    total = 0
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += path.stat().st_size
            finally:
                os.close(fd)
    return total


async def some_calls(target: str, artifacts: Path, n: int) -> None:
    import grpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        for request in make_requests(artifacts, n, seed=3):
            await stub.Recommend(request, timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--calls", type=int, default=200, help="calls before measuring memory")
    parser.add_argument("--evict", action="store_true", help="start with a cold page cache")
    args = parser.parse_args()
    if args.evict:
        print(f"evicted {evict(args.artifacts) / 1e6:,.0f} MB of artifacts from the page cache")

    port, metrics_port = free_port(), free_port()
    target = f"127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "recsys.cli.main", "serve", "--artifacts", str(args.artifacts),
        "--port", str(port), "--metrics-port", str(metrics_port),
    ]  # fmt: skip
    if args.workers > 1:
        cmd += ["--workers", str(args.workers)]
    start = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        asyncio.run(wait_serving_for(target, 300))
        ready = time.perf_counter() - start
        print(f"cold start to health SERVING: {ready:.1f} s ({args.workers} worker(s))")
        asyncio.run(some_calls(target, args.artifacts, args.calls))
        rss = pss = 0
        for pid in process_tree(server.pid):
            r = rollup_kb(pid)
            rss += r["Rss"]
            pss += r["Pss"]
            print(f"  pid {pid}: RSS {r['Rss'] / 1024:,.0f} MB, PSS {r['Pss'] / 1024:,.0f} MB")
        print(f"total: RSS {rss / 1024:,.0f} MB, PSS {pss / 1024:,.0f} MB")
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
