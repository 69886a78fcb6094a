"""Shedding at light load and behaviour at overload, against a real `recsys serve`, for several
server configurations side by side in one run.

Copies ``--artifacts`` to a temporary root, makes sure it holds a second ranker version, and for
each configuration (``--config NAME=SERVE_ARGS``; default ``old``, gRPC's bounds off,
and ``new``, the defaults) starts `recsys serve` on it (cache off, so every call reaches the
batcher) with the control plane in Redis (a private key prefix, removed at the end). Then:

1. **light load with promotions**: ``--clients`` closed-loop clients (6) for the whole phase
   while ``--promotions`` routing writes (50) alternate the production version, one every
   ``--promotion-interval`` seconds. Counts every status code: RESOURCE_EXHAUSTED here is a
   shed at light load (the target is 0).
2. **unloaded**: one closed-loop client for ``--seconds``: the unloaded p99.
3. **capacity**: ``--saturate-clients`` closed-loop clients for ``--seconds``: answered calls/s.
4. **overload**: an open loop at ``--overload`` x capacity (3) for ``--seconds``: p99 of the
   admitted (answered) calls, counted from each call's scheduled send time, against the
   unloaded p99; how fast sheds answer (from the call's actual send) and their share; and the
   calls gRPC core ended itself (CANCELLED: beyond ``--max-pending-rpcs``) and how fast.

Phases 2-4 run in a separate load-generator process (benchmarks/load_generator.py), so the load is
not generated on the measuring process's event loop; ``--server-cpus`` and ``--generator-cpus`` pin
the two apart with ``taskset``. ``--generator native`` (the default) sends them from gRPC's C++
library (benchmarks/loadgen/loadgen.cc): on one core the Python generator falls tens of ms behind
its schedule at the ~4,000 calls/s a 3x overload of a quiet machine's server asks for, and its own
lag would be measured as the server's (``--generator python`` keeps it, for comparison with earlier
runs). Every configuration gets the same offered rate (``--overload`` x the first configuration's
capacity); ``--rounds`` runs them in turn again, so a change in the machine's load shows in every
configuration alike. The same open loop is then sent to benchmarks/echo_server.py (gRPC and protobuf
with no work): the floor this machine can do at that rate, whatever admission does; with the native
generator, the Python one is sent to the echo server too, so the two generators' floors are compared
in the same run.

The server's GC pauses (``recsys_gc_pause_seconds``), sheds (``recsys_requests_total``) and
servicer time (``recsys_request_duration_seconds``) come from its /metrics: client latency
minus servicer time is what a call spent in gRPC and the event loop before the servicer.

    python -m benchmarks.bench_overload --artifacts /tmp/art [--seconds 10] [--promotions 50]
        [--config old="--max-concurrent-rpcs 0 --max-pending-rpcs 0"] [--config new=""]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from benchmarks.bench_latency import (
    cpu_seconds,
    free_port,
    front_bounds,
    make_requests,
    pinned,
    start_bench_front,
    wait_serving_for,
)
from benchmarks.bench_swap import NAME, copy_with_two_versions, delete_prefix, write_route
from benchmarks.load_generator import CHANNELS, SHED, call, ms, require_native
from recsys.artifacts import ArtifactRoot, versions
from recsys.control.backends import open_store
from recsys.ranking.registry import ModelRegistry
from recsys.serving.front import Backend, FrontSettings
from recsys.v1 import recommender_pb2, recommender_pb2_grpc

DEFAULT_CONFIGS = ("old=--max-concurrent-rpcs 0 --max-pending-rpcs 0", "new=")


@dataclass
class Tally:
    """Status codes and latencies of answered calls (the light-load phase, in this process)."""

    codes: dict[str, int] = field(default_factory=dict)
    answered: list[float] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)
    """One example of each status's details."""

    def add(self, code: str, seconds: float, details: str = "") -> None:
        self.codes[code] = self.codes.get(code, 0) + 1
        if code != "OK" and code not in self.details:
            self.details[code] = details
        if code == "OK":
            self.answered.append(seconds)


def loadavg() -> list[str]:
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


async def closed_loop(
    stubs: Sequence[recommender_pb2_grpc.RecommenderAsyncStub],
    requests: Sequence[recommender_pb2.RecommendRequest],
    clients: int,
    until: asyncio.Event,
) -> Tally:
    tally = Tally()

    async def client(n: int) -> None:
        stub, k = stubs[n % len(stubs)], n
        while not until.is_set():
            request = requests[k % len(requests)]
            k += clients
            start = time.perf_counter()
            code, details = await call(stub, request)
            tally.add(code, time.perf_counter() - start, details=details)

    await asyncio.gather(*(client(n) for n in range(clients)))
    return tally


def scrape(port: int) -> dict[str, float]:
    """The server's GC pause and request counters, by sample name and labels."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    wanted = (
        "recsys_gc_pause_seconds",
        "recsys_requests_total",
        "recsys_request_duration_seconds_sum",
        "recsys_request_duration_seconds_count",
    )
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(wanted)
    }


def gc_summary(before: dict[str, float], after: dict[str, float]) -> dict[str, object]:
    out: dict[str, object] = {}
    for generation in ("0", "1", "2"):
        label = f'{{generation="{generation}"}}'
        count = after.get(f"recsys_gc_pause_seconds_count{label}", 0.0) - before.get(
            f"recsys_gc_pause_seconds_count{label}", 0.0
        )
        total = after.get(f"recsys_gc_pause_seconds_sum{label}", 0.0) - before.get(
            f"recsys_gc_pause_seconds_sum{label}", 0.0
        )
        out[f"gen{generation}"] = {
            "collections": int(count),
            "mean_ms": round(total / count * 1000, 2) if count else None,
        }
    return out


def servicer_mean_ms(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Mean time of a Recommend call inside the servicer between two scrapes."""
    name = "recsys_request_duration_seconds"
    count = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
    total = after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)
    return round(total / count * 1000, 2) if count else None


def generate(
    args: argparse.Namespace, root: Path, target: str, **load: float | str
) -> dict[str, object]:
    """Run benchmarks/load_generator.py (``clients=N`` or ``rate=R``; ``generator=python`` or
    ``native``, default ``--generator``) and return its summary."""
    cmd = [
        sys.executable, "-m", "benchmarks.load_generator", "--target", target,
        "--artifacts", str(root), "--seconds", str(load.pop("seconds", args.seconds)),
    ]  # fmt: skip
    if load.pop("generator", args.generator) == "native":
        cmd.append("--native")
    for name, value in load.items():
        cmd += [f"--{name}", str(value)]
    out = subprocess.run(pinned(args.generator_cpus, cmd), check=True, capture_output=True)
    summary: dict[str, object] = json.loads(out.stdout)
    return summary


async def light_load(
    args: argparse.Namespace, root: Path, target: str, metrics_port: int
) -> dict[str, object]:
    """Phase 1, in this process: closed-loop clients while routing writes alternate versions."""
    store = open_store(args.control, root, prefix=args.prefix)
    registry = ModelRegistry(ArtifactRoot(root), store)
    routing, _ = registry.routing()
    first = routing.models[NAME].production
    second = next(v for v in reversed(versions(root / "models" / NAME)) if v != first)
    requests = make_requests(root, 5000, seed=5)
    channels = [grpc.aio.insecure_channel(target) for _ in range(CHANNELS)]
    stubs = [recommender_pb2_grpc.RecommenderStub(c) for c in channels]
    try:
        before = scrape(metrics_port)
        stop = asyncio.Event()
        load = asyncio.ensure_future(closed_loop(stubs, requests, args.clients, stop))
        production, previous = first, second
        for _ in range(args.promotions):
            production, previous = previous, production
            await asyncio.to_thread(write_route, store, production, previous)
            await asyncio.sleep(args.promotion_interval)
        await asyncio.sleep(1.0)
        stop.set()
        light = await load
        after = scrape(metrics_port)
    finally:
        for c in channels:
            await c.close(None)
        store.close()
    return {
        "clients": args.clients,
        "promotions": args.promotions,
        "calls": sum(light.codes.values()),
        "codes": light.codes,
        "details": light.details,
        "sheds": light.codes.get(SHED, 0),
        "p50_ms": ms(light.answered, 50),
        "p99_ms": ms(light.answered, 99),
        "max_ms": ms(light.answered, 100),
        "server_gc": gc_summary(before, after),
        "loadavg": loadavg(),
    }


def measure(
    args: argparse.Namespace,
    root: Path,
    target: str,
    metrics_port: int,
    rate: float | None,
    pids: dict[str, int],
) -> dict[str, object]:
    """Phases 1-4 against one running server. ``rate``: the open loop's calls/s (None: this
    configuration's capacity x ``--overload``). ``pids``: the processes whose CPU over the
    overload phase is reported (the server's, and the front's when there is one)."""
    result: dict[str, object] = {"loadavg_start": loadavg()}
    generate(args, root, target, clients=8, seconds=3.0)  # warm-up
    if args.promotions:
        result["light_load"] = asyncio.run(light_load(args, root, target, metrics_port))
    unloaded = generate(args, root, target, clients=1)
    saturated = generate(args, root, target, clients=args.saturate_clients)
    capacity = float(saturated["answered_per_s"])  # type: ignore[arg-type]
    offered = rate if rate is not None else args.overload * capacity
    before = scrape(metrics_port)
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    over = generate(args, root, target, rate=round(offered, 1))
    cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
    codes = over["codes"]
    assert isinstance(codes, dict)
    answered, calls = int(codes.get("OK", 0)), int(sum(codes.values()))
    after = scrape(metrics_port)
    unloaded_p99 = unloaded["answered_p99_ms"]
    admitted_p99 = over["answered_p99_ms"]
    result["overload"] = {
        "unloaded_p50_ms": unloaded["answered_p50_ms"],
        "unloaded_p99_ms": unloaded_p99,
        "capacity_per_s": capacity,
        "saturated_codes": saturated["codes"],
        "offered_per_s": round(offered, 1),
        "codes": over["codes"],
        "details": over["details"],
        "admitted_per_s": over["answered_per_s"],
        "admitted_p50_ms": over["answered_p50_ms"],
        "admitted_p99_ms": admitted_p99,
        "admitted_p99_over_unloaded_p99": (
            round(admitted_p99 / unloaded_p99, 2)  # type: ignore[operator]
            if admitted_p99 and unloaded_p99
            else None
        ),
        "shed_share": over["shed_share"],
        "shed_p50_ms": over["shed_p50_ms"],
        "shed_p99_ms": over["shed_p99_ms"],
        "other_codes_p50_ms": over["failed_p50_ms"],
        "other_codes_p99_ms": over["failed_p99_ms"],
        "servicer_mean_ms": servicer_mean_ms(before, after),
        # CPU over the phase: the server's per answered call, the front's per call offered.
        "server_cpu_ms_per_answered": round(cpu["server"] * 1000 / max(answered, 1), 3),
        "front_cpu_us_per_offered": (
            round(cpu["front"] * 1e6 / max(calls, 1), 1) if "front" in cpu else None
        ),
        "cpu_seconds": {name: round(value, 2) for name, value in cpu.items()},
        "generator_send_lag_p99_ms": over["send_lag_p99_ms"],
        "loadavg": loadavg(),
    }
    return result


def serve_config(
    args: argparse.Namespace,
    root: Path,
    tmp: Path,
    serve_args: list[str],
    rate: float | None,
    front: FrontSettings | None = None,
) -> dict[str, object]:
    port, metrics_port = free_port(), free_port()
    cmd = [
        sys.executable, "-m", "recsys.cli.main", "serve", "--artifacts", str(root),
        "--port", str(port), "--metrics-port", str(metrics_port), "--cache-entries", "0",
        "--control", args.control, "--control-prefix", args.prefix,
        "--exposure-dir", str(tmp / "exposures"), *args.serve_arg, *serve_args,
    ]  # fmt: skip
    server = subprocess.Popen(
        pinned(args.server_cpus, cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    front_process = None
    try:
        asyncio.run(wait_serving_for(f"127.0.0.1:{port}", 300))
        target = f"127.0.0.1:{port}"
        if front is not None:  # the load goes through the front, on the server's CPUs
            backends = (Backend("127.0.0.1", port),)
            front_process, target = start_bench_front(front, backends, tmp, args.server_cpus)
            asyncio.run(wait_serving_for(target, 30))
        pids = {"server": server.pid}
        if front_process is not None:
            pids["front"] = front_process.pid
        return measure(args, root, target, metrics_port, rate, pids)
    finally:
        for process in (front_process, server):
            if process is not None:
                process.terminate()
                process.wait(timeout=60)


def echo_floor(args: argparse.Namespace, root: Path, rate: float) -> dict[str, object]:
    """The same open loop against benchmarks/echo_server.py: gRPC's own cost at that rate, from
    the generator of the run (and from the Python one too when that is the native one)."""
    port = free_port()
    cmd = [sys.executable, "-m", "benchmarks.echo_server", "--port", str(port)]
    echo = subprocess.Popen(
        pinned(args.server_cpus, cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    generators = ("native", "python") if args.generator == "native" else ("python",)
    floors: dict[str, object] = {}
    try:
        time.sleep(3.0)  # the echo server has no health service
        target = f"127.0.0.1:{port}"
        for generator in generators:
            unloaded = generate(args, root, target, clients=1, generator=generator)
            over = generate(args, root, target, rate=round(rate, 1), generator=generator)
            floors[generator] = {
                "unloaded_p99_ms": unloaded["answered_p99_ms"],
                "offered_per_s": round(rate, 1),
                "codes": over["codes"],
                "answered_p50_ms": over["answered_p50_ms"],
                "answered_p99_ms": over["answered_p99_ms"],
                "send_lag_p99_ms": over["send_lag_p99_ms"],
                "loadavg": loadavg(),
            }
    finally:
        echo.terminate()
        echo.wait(timeout=60)
    return floors


def side_by_side(results: dict[str, dict[str, object]]) -> list[str]:
    """One line per configuration: the figures the targets are about."""
    lines = []
    for name, result in results.items():
        o = result.get("overload", {})
        assert isinstance(o, dict)
        light = result.get("light_load", {})
        assert isinstance(light, dict)
        calls = sum(o["codes"].values())
        lines.append(
            f"{name}: sheds at light load {light.get('sheds')} of {light.get('calls')}; "
            f"unloaded p99 {o['unloaded_p99_ms']} ms; at {o['offered_per_s']}/s admitted p99 "
            f"{o['admitted_p99_ms']} ms ({o['admitted_p99_over_unloaded_p99']}x), shed p50/p99 "
            f"{o['shed_p50_ms']}/{o['shed_p99_ms']} ms, shed share {o['shed_share']}; "
            f"ended by gRPC core (CANCELLED) {o['codes'].get('CANCELLED', 0)} of {calls}, "
            f"p50/p99 {o['other_codes_p50_ms']}/{o['other_codes_p99_ms']} ms; "
            f"load {' '.join(o['loadavg'])}"
        )
    return lines


def front_of(text: str) -> tuple[str, FrontSettings]:
    """``NAME=IN_FLIGHT/QUEUE_MS[/QUEUED]`` of ``--front`` (see :func:`front_bounds`)."""
    name, _, bounds = text.partition("=")
    return name, front_bounds(bounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--control", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--promotions", type=int, default=50)
    parser.add_argument("--promotion-interval", type=float, default=0.5)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--saturate-clients", type=int, default=32)
    parser.add_argument("--overload", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=8, help="seed of the second ranker version")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        help="NAME=SERVE_ARGS, one server configuration (repeat; default: "
        + "; ".join(DEFAULT_CONFIGS)
        + ")",
    )
    parser.add_argument(
        "--front",
        action="append",
        type=front_of,
        default=[],
        metavar="NAME=IN_FLIGHT/QUEUE_MS[/QUEUED]",
        help="drive configuration NAME through the admission front (recsys/serving/front.py): "
        "HAProxy giving the server at most IN_FLIGHT calls at once, refusing calls that "
        "waited QUEUE_MS for one, and (QUEUED > 0) calls beyond QUEUED waiting (repeat for more)",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="run the configurations in turn this many times"
    )
    parser.add_argument("--serve-arg", action="append", default=[], help="passed to every serve")
    parser.add_argument("--server-cpus", help="taskset CPU list for the server (default: any)")
    parser.add_argument("--generator-cpus", help="taskset CPU list for the load generator")
    parser.add_argument("--no-echo", action="store_true", help="skip the echo-server floor")
    parser.add_argument(
        "--generator",
        choices=("native", "python"),
        default="native",
        help="what sends phases 2-4: benchmarks/loadgen/loadgen.cc (gRPC's C++ library, built on "
        "first use) or benchmarks/load_generator.py's event loop (default: native)",
    )
    args = parser.parse_args()
    args.prefix = f"bench-overload-{uuid.uuid4().hex[:8]}:"
    configs = [c.split("=", 1) for c in args.config or DEFAULT_CONFIGS]
    fronts = dict(args.front)
    if unknown := set(fronts) - {name for name, _ in configs}:
        parser.error(f"--front {sorted(unknown)}: expected the NAME of a --config")

    if args.generator == "native":
        require_native(parser)
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-overload-") as tmp:
        root = copy_with_two_versions(args.artifacts, Path(tmp), args.seed)
        rate: float | None = None
        try:
            for round_ in range(1, args.rounds + 1):
                for name, serve_args in configs:
                    key = name if args.rounds == 1 else f"{name} (round {round_})"
                    results[key] = serve_config(
                        args, root, Path(tmp), shlex.split(serve_args), rate, fronts.get(name)
                    )
                    overload = results[key]["overload"]
                    assert isinstance(overload, dict)
                    rate = float(overload["offered_per_s"])
                    print(side_by_side({key: results[key]})[0], file=sys.stderr, flush=True)
        finally:
            delete_prefix(args.control, args.prefix)
        echo = None if args.no_echo or rate is None else echo_floor(args, root, rate)
    report = {
        "command": " ".join(["python -m benchmarks.bench_overload", *sys.argv[1:]]),
        "configs": dict(configs),
        "generator": args.generator,
        "side_by_side": side_by_side(results),
        "echo_floor": echo,
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
