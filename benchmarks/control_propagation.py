"""How long until every server applies a new experiments version? Several servers, one Redis.

    .venv/bin/python benchmarks/control_propagation.py [--artifacts /tmp/art100] [--servers 4]
        [--writes 20] [--control redis://127.0.0.1:6379/0] [--layers 100 --experiments 1200]

It starts ``--servers`` real ``recsys serve`` processes on a copy
of ``--artifacts`` (the copy takes their exposure logs; the original is only read), all
following one Redis under a fresh key prefix (the first server seeds it from the copy's control
documents). It polls Recommend on every server (one call in flight per server, the next
``--poll-interval`` after the last answer), then writes ``--writes`` new experiments versions
through the ops write path (ramp, re-salt rule, validation, compare-and-set) and records, for
every (write, server), the time from the start of the write to the arrival of the first
response that carries the new ``config_version``: an upper bound on when that server swapped
the version in (it adds up to one poll interval and one call's round trip). Every response is
checked: a server never answers with an older version after a newer one (a swap is atomic and
final), and every server reaches every version.

With ``--layers``/``--experiments`` the document is the synthetic one of bench_assignment.py (a
bigger document to parse and compile), applied once before the timed writes. Keys live under a
fresh prefix, deleted at the end; the artifact copy is deleted too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis

from recsys.control.redis_store import RedisStore
from recsys.control.store import EXPERIMENTS
from recsys.experiments import changes
from recsys.experiments.config import parse_config
from recsys.experiments.synthetic import synthetic_config
from recsys.v1 import recommender_pb2, recommender_pb2_grpc

LISTENING = re.compile(r"recsys listening on [^ ]+:(\d+) \(metrics on :(\d+)\)")
APPLIED = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) INFO recsys.serving.control "
    r"control plane: experiments version (\d+) applied"
)
SERVING = "recsys serving on"
USER_ID = "user-0000001"


def _document(args: argparse.Namespace) -> dict[str, Any] | None:
    """The synthetic document to start from, or None to keep the seeded default."""
    if args.layers:
        return synthetic_config(args.layers, args.experiments, coverage=0.5)
    return None


def _ramped(store: RedisStore, experiment: str, i: int) -> tuple[int, dict[str, Any]]:
    """The stored version and the next document: ``experiment`` ramped to 10% or 15%."""
    current = store.read(EXPERIMENTS)
    assert current is not None, "the experiments document disappeared"
    edited = changes.ramp(current.body, experiment, 10 + (i % 2) * 5)
    prepared = changes.prepare_write(current.body, edited)
    parse_config(prepared.doc)  # what `recsys experiments ramp` validates before writing
    return current.version, prepared.doc


def _delete_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    p90 = (
        statistics.quantiles(values, n=10, method="inclusive")[8] if len(values) > 1 else values[0]
    )
    return statistics.median(values), p90, max(values)


def _print_table(rows: list[tuple[str, list[float]]]) -> None:
    print(f"{'write start -> applied, ms':<34} {'p50':>8} {'p90':>8} {'max':>8} {'> 1 s':>9}")
    for label, values in rows:
        p50, p90, top = _quantiles(values)
        late = f"{sum(v > 1000 for v in values)}/{len(values)}"
        print(f"{label:<34} {p50:>8.1f} {p90:>8.1f} {top:>8.1f} {late:>9}")


# -- real servers --------------------------------------------------------------------------------


@dataclass
class ServerProcess:
    """One `recsys serve` process; its log is read in a thread for its ports and readiness."""

    process: subprocess.Popen[str]
    log: list[str] = field(default_factory=list)
    port: int = 0
    metrics_port: int = 0
    ready: threading.Event = field(default_factory=threading.Event)
    applied: dict[int, float] = field(default_factory=dict)
    """experiments version -> when the server logged its swap (epoch seconds, ms resolution)"""

    @classmethod
    def start(cls, artifacts: Path, control: str, prefix: str) -> ServerProcess:
        recsys = Path(sys.executable).parent / "recsys"
        process = subprocess.Popen(
            [str(recsys), "serve", "--artifacts", str(artifacts), "--control", control,
             "--control-prefix", prefix, "--host", "127.0.0.1", "--port", "0",
             "--metrics-port", "0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        server = cls(process)
        threading.Thread(target=server._read_log, daemon=True).start()
        return server

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line.rstrip())
            if (m := LISTENING.search(line)) is not None:
                self.port, self.metrics_port = int(m.group(1)), int(m.group(2))
            if SERVING in line:
                self.ready.set()
            if (m := APPLIED.search(line)) is not None:
                stamp = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
                self.applied[int(m.group(3))] = stamp + int(m.group(2)) / 1000

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(self.log[-20:])
                raise SystemExit(f"recsys serve (pid {self.process.pid}) did not start:\n{tail}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


@dataclass
class Poller:
    """Calls Recommend on one server back to back; keeps (arrival time, config version)."""

    port: int
    seen: list[tuple[float, int]] = field(default_factory=list)
    errors: int = 0
    regressions: int = 0
    highest: int = 0

    async def run(self, stop: asyncio.Event, interval: float) -> None:
        request = recommender_pb2.RecommendRequest(user_id=USER_ID, num_results=5)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = recommender_pb2_grpc.RecommenderStub(channel)
            while not stop.is_set():
                try:
                    reply = await stub.Recommend(request, timeout=5)
                except grpc.aio.AioRpcError:
                    self.errors += 1
                    await asyncio.sleep(0.05)
                    continue
                version = int(reply.config_version)
                if version < self.highest:
                    self.regressions += 1
                self.highest = max(self.highest, version)
                self.seen.append((time.monotonic(), version))
                await asyncio.sleep(interval)

    def first_at(self, version: int) -> float | None:
        """When the first response carrying ``version`` (or a later one) arrived."""
        return next((t for t, v in self.seen if v >= version), None)


async def _measure_servers(
    args: argparse.Namespace, store: RedisStore, pollers: list[Poller]
) -> tuple[dict[int, tuple[float, float]], int]:
    """Write the versions; returns {version: write start (monotonic, epoch)} and the document
    size."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(p.run(stop, args.poll_interval)) for p in pollers]

    async def all_reach(version: int, within: float) -> None:
        deadline = time.monotonic() + within
        while not all(p.highest >= version for p in pollers):
            if time.monotonic() > deadline:
                got = [p.highest for p in pollers]
                raise SystemExit(f"version {version}: servers are at {got} after {within}s")
            await asyncio.sleep(0.002)

    try:
        current = await asyncio.to_thread(store.read, EXPERIMENTS)
        assert current is not None, "the servers did not seed the experiments document"
        await all_reach(current.version, within=30)
        experiment = "restaurant-cap"
        start_doc = _document(args)
        if start_doc is not None:
            prepared = changes.prepare_write(current.body, start_doc)
            parse_config(prepared.doc)
            written = await asyncio.to_thread(
                store.write, EXPERIMENTS, prepared.doc,
                expected_version=current.version, author="bench",
            )  # fmt: skip
            await all_reach(written.version, within=60)
            experiment = "exp-1-0"
        started: dict[int, tuple[float, float]] = {}
        size = 0
        for i in range(args.writes):
            version, doc = await asyncio.to_thread(_ramped, store, experiment, i)
            size = len(json.dumps(doc))
            started[version + 1] = (time.monotonic(), time.time())
            await asyncio.to_thread(
                store.write, EXPERIMENTS, doc, expected_version=version, author="bench"
            )
            await all_reach(version + 1, within=30)
            await asyncio.sleep(args.interval)
        return started, size
    finally:
        stop.set()
        await asyncio.gather(*tasks)


def run_servers(args: argparse.Namespace) -> None:
    prefix = f"recsys-bench-{uuid.uuid4().hex[:12]}:"
    workdir = Path(tempfile.mkdtemp(prefix="recsys-propagation-"))
    store = RedisStore(args.control, prefix=prefix)
    servers: list[ServerProcess] = []
    try:
        artifacts = workdir / "artifacts"
        shutil.copytree(args.artifacts, artifacts, ignore=shutil.ignore_patterns("exposures"))
        for _ in range(args.servers):
            servers.append(ServerProcess.start(artifacts, args.control, prefix))
        for server in servers:
            server.wait_ready(timeout=180)
        pollers = [Poller(s.port) for s in servers]
        started, size = asyncio.run(_measure_servers(args, store, pollers))
    finally:
        for server in servers:
            server.stop()
        _delete_prefix(args.control, prefix)
        store.close()
        shutil.rmtree(workdir, ignore_errors=True)

    per_server: list[float] = []
    slowest: list[float] = []
    swapped: list[float] = []
    swapped_slowest: list[float] = []
    for version, (t0, wall0) in started.items():
        arrivals = [p.first_at(version) for p in pollers]
        assert all(a is not None for a in arrivals), f"version {version} missing on a server"
        delays = [(a - t0) * 1e3 for a in arrivals if a is not None]
        per_server += delays
        slowest.append(max(delays))
        logged = [(s.applied[version] - wall0) * 1e3 for s in servers if version in s.applied]
        swapped += logged
        if len(logged) == len(servers):
            swapped_slowest.append(max(logged))
    calls = sum(len(p.seen) for p in pollers)
    times = [t for p in pollers for t, _ in p.seen]
    elapsed = max(times) - min(times)
    print(
        f"{args.servers} `recsys serve` processes on {args.artifacts}, {args.writes} writes, one "
        f"Redis ({args.control}); experiments document {size / 1024:.1f} KiB ({size} bytes)"
    )
    print(
        f"Recommend polled every {args.poll_interval * 1e3:.0f} ms on every server: {calls} calls "
        f"({calls / elapsed / args.servers:.0f}/s per server), {sum(p.errors for p in pollers)} "
        f"errors, {sum(p.regressions for p in pollers)} responses with an older version after a "
        "newer one"
    )
    print(
        "swap = the server's own log line 'experiments version N applied' (ms resolution); "
        "first response = the first Recommend answer carrying N (an upper bound)"
    )
    _print_table(
        [
            ("swap, each server", swapped),
            ("swap, slowest server of each write", swapped_slowest),
            ("first response, each server", per_server),
            ("first response, slowest server", slowest),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--control", default=os.environ.get("RECSYS_CONTROL") or "redis://127.0.0.1:6379/0"
    )
    parser.add_argument(
        "--artifacts", type=Path, default=Path("/tmp/art100"), help="a built artifact root"
    )
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--writes", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between writes")
    parser.add_argument(
        "--poll-interval", type=float, default=0.02, help="seconds between Recommend polls"
    )
    parser.add_argument("--layers", type=int, default=0)
    parser.add_argument("--experiments", type=int, default=0)
    args = parser.parse_args()
    run_servers(args)


if __name__ == "__main__":
    main()
