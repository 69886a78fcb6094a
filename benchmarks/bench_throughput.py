"""Throughput against the gRPC limit, in one go on one machine: echo, naive, recsys.

Starts each server in turn as a subprocess on free ports and drives it, ``--concurrency`` calls
in flight over several channels, from the native load generator (``--generator native``, the
default: benchmarks/loadgen/loadgen.cc, gRPC's C++ library, in its own process) or from this
process's event loop (``--generator python``, grpc.aio). On this machine's two cores the load
generator shares the cores with the server; the Python loop costs far more CPU per call, and
its own late sends at the open loop's rate were counted as the server's latency (benchmarks/
README.md, "The throughput benchmark's load generator"):

- ``echo``: the same service and messages with no work (benchmarks/echo_server.py): the limit;
- ``naive``: per request, exact top-500 retrieval, all 500 scored, no batching
  (benchmarks/naive_server.py): the reference-quality baseline;
- ``recsys-uncached``: ``recsys serve --cache-entries 0`` on distinct requests (every one a miss);
- ``recsys-mix``: ``recsys serve`` (cache on) on a realistic mix: users drawn Zipf(1.1) over
  the world's users, each visit a burst of feed refreshes from the same address, 80% home
  surface; unknown users 5%;
- ``recsys-hit``: ``recsys serve`` (cache on) on one request repeated (each call with its own
  request id): every call a cache hit, to set against echo.

The hit's and the mix's closed loops keep at most ``LOOP_CALLS`` calls in flight a worker (see
there), the others ``--concurrency``.

Every request carries a delivery location (near the user's home) unless ``--located-share``
says otherwise: a request without one is served at the user's home anyway, so leaving it out
would only make the benchmark differ from the traffic it stands for.

Each server's run sends its requests in order across its phases, without starting the list
again while it lasts (``--requests``; each phase reports ``requests_wrapped``), so the mix's
cache meets fresh traffic in every phase and its hit rate, reported per phase, is the traffic's
own: about two thirds of the mix's calls refresh a feed already served. (Each phase used to
start the list again: the mix's open loop then repeated calls the cache had seen, ~all hits.)
Each server runs a closed-loop saturation phase (requests/s at ``--concurrency``), then an
open-loop phase at 70% of that rate (latencies counted from each call's scheduled send time,
so a stall is not hidden). Server CPU per request is user+system time of the server process
(and its children, for ``--workers``, and HAProxy, for ``--front``) from /proc divided by the
calls answered, over each phase:
on a shared machine this is the robust figure. It is reported per successful call (the
process's whole CPU, including what the calls shed with RESOURCE_EXHAUSTED cost, over the calls
answered OK) beside the shed share (RESOURCE_EXHAUSTED from the servicer and CANCELLED from gRPC
core's bound on waiting calls alike); requests/s per core is successful calls per CPU second.
A call's CPU depends on the rate it is served at (batch sizes, loop wake-ups), and a saturated
phase full of refusals charges their CPU to the answered calls: ``--same-rate`` compares CPU per
call in open-loop phases at one rate instead.

    python -m benchmarks.bench_throughput --artifacts /tmp/art100 [--seconds 15] [--only echo]
        [--baseline DIR]   # also the recsys servers of another checkout (old vs new, one run)
        [--variant d2='--batch-max-delay-ms 2']  # also each recsys server with other flags
        [--rounds 2]       # the whole list twice (ratios from the median per server); in
                           # odd rounds each server's baseline and variants run before it
        [--same-rate]      # baselines and variants at the open-loop rate of what they are
                           # compared with, and echo at the hit's rate: CPU per call at equal load
        [--generator python]  # send from this process's event loop, not the native generator
        [--generator native --generator python]  # each server again, right after it, with
                           # the second generator, as NAME-python: the two in one run
        [--front 32/4 --front 6/1@12]  # also each behind the admission front, IN_FLIGHT/QUEUE_MS
                           # [@CALLS in flight in its closed loops, e.g. workers x IN_FLIGHT]

Each recsys server's result also has ``stages_saturated`` (and ``at_70pct.stages`` for the open
loop), from the server's metrics page over the phase: the mean wall time of each stage per run
(per batch for the batched stages), the mean batch size, each item's mean wait for its batch,
each batch's mean run and each call's mean time in the servicer, and ``batch_busy``: seconds
of batches run per second of the phase, summed over workers (1.0: one batch thread never idle),
and the p99 of the servicer's time, of an item's wait and of a batch's run, from the
histograms' buckets (``servicer_p99_ms``, ``queue_delay_p99_ms``, ``batch_run_p99_ms``); and the
garbage collector's passes over the phase, which stall every thread of a worker
(``gc_passes``, their mean ``gc_pause_ms``, ``gc_pause_p99_ms`` and ``gc_share``; by
generation ``gc_pause_g0_passes`` and ``gc_pause_g0_ms``, ...), and the objects those passes
freed per answered call (``gc_collected_per_call``: garbage in reference cycles).
Below saturation these say where a call's latency went: queued for a batch, in its batch, or on
the event loop around them (servicer time minus the two); and whether the client's p99 was
spent in the server at all. ``threads_us_per_call`` (both phases)
says where its CPU went: each thread's CPU per answered call, by the thread's name in the
operating system, summed over the workers (``main``: each process's event loop; the batch
threads, ``batch-recommend``, ``exposure-writer`` and the exposure log's ``log-compress`` name
themselves; ``event_engine`` is gRPC core's; unnamed Python threads, gRPC's poller among them,
show as ``python``; ``haproxy`` is the front). With the native generator the open loop also has
a ``timeline`` (benchmarks/load_generator.py, ``timeline``): its calls in 250 ms windows by due
time, the slowest window (its p50, longest call and calls not answered OK) and how many
windows' p50 was over 4x the phase's: a stall shows as such a run of windows, which the
phase's p99 alone does not tell from a tail spread evenly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.bench_latency import (
    cpu_seconds,
    free_port,
    front_bounds,
    pinned,
    start_bench_front,
    stat_cpu,
)
from benchmarks.load_generator import require_native, run_native, timeline, write_requests
from recsys.serving.front import Backend, FrontSettings
from recsys.serving.routing import user_metadata
from recsys.settings import ServeSettings
from recsys.v1 import recommender_pb2, recommender_pb2_grpc
from recsys.world import load_world

CHANNELS = 16
"""Client channels, each its own TCP connection: ``recsys serve --workers N`` shares the port
with SO_REUSEPORT, which gives each connection to one worker, so the load spreads over the
workers only across many connections."""
CHANNEL_OPTIONS = (("grpc.use_local_subchannel_pool", 1),)
"""gRPC shares one connection among every channel to the same target (its global subchannel
pool); a channel of its own pool opens its own connection."""
ZIPF_EXPONENT = 1.1
HIT_REQUEST_IDS = 1_000
REFRESHES_PER_VISIT = (1, 6)
"""A visit is 1-5 feed loads from one address (open, pull to refresh, come back)."""
LOOP_CALLS = ServeSettings.max_pending_rpcs
"""Calls in flight per worker in the closed loops of the hit and the mix (at most;
``--concurrency`` if lower). A hit is answered on the event loop alone, so nearly every call
in flight waits in gRPC core for the loop, and the server's default bound on such calls
(``--max-pending-rpcs``, 32 a worker) ends those beyond it as CANCELLED. At ``--concurrency``
64 against one worker that ended 86% of the hit's calls and 65% of the mix's, each sent again
at once: the saturated rate, which sets the open loop's (and echo-at-hit-rate's), was the
refusals' rate, half the hit's (benchmarks/README.md, "Seventeenth round"). At this many a
worker nothing waits beyond the bound. Misses wait in the servicer for their batch, not in
gRPC core, and keep ``--concurrency``."""


@dataclass(frozen=True)
class Server:
    name: str
    command: list[str]
    requests: str
    """``distinct``, ``mix`` or ``hit``."""
    code: Path | None = None
    """Run the server from this checkout (``--baseline``); None: this one."""
    rate_of: str | None = None
    """With ``--same-rate``: run the open-loop phase at this server's open-loop rate (the one it
    is compared with), not at 70% of its own saturation."""
    front: FrontSettings | None = None
    """Drive the server through the admission front (``--front``): its workers on a port each,
    HAProxy in front of them on the server's CPUs."""
    concurrency: int | None = None
    """Calls in flight in the closed-loop phases (``--front ...@CALLS``); None: the
    ``--concurrency`` of the run."""
    generator: str = "native"
    """What sends the calls (``--generator``): ``native`` or ``python``."""


def family(pid: int) -> list[int]:
    """``pid`` and its direct children (the worker processes of --workers N)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [pid, *(int(c) for c in children.read_text().split())] if children.exists() else [pid]


def children_cpu(pid: int) -> float:
    """CPU of ``pid`` and of its direct children (the worker processes of --workers N)."""
    total = 0.0
    for member in family(pid):
        with contextlib.suppress(FileNotFoundError):  # a worker that just exited
            total += cpu_seconds(member)
    return total


def machine_ticks(stat: Path = Path("/proc/stat")) -> tuple[int, int]:
    """The machine's CPU ticks so far, all CPUs: (every state's, steal's). Steal is time the
    hypervisor gave this machine's CPUs to others: a phase with much of it measured a slower
    machine, whatever the server did."""
    fields = stat.read_text().split("\n", 1)[0].split()
    if not fields or fields[0] != "cpu":
        raise ValueError(f"{stat}: expected the all-CPU line first")
    ticks = [int(f) for f in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return sum(ticks), ticks[7]


def steal_share(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """Share of the machine's CPU time between two :func:`machine_ticks` that was stolen."""
    total = after[0] - before[0]
    return round((after[1] - before[1]) / total, 4) if total > 0 else None


MAIN_THREAD = "main"
"""Each process's first thread: a server's event loop (grpc.aio, the servicer)."""


def thread_cpu(pids: Sequence[int]) -> dict[str, float]:
    """CPU seconds of every thread of ``pids`` and their direct children, summed by the
    thread's name in the operating system (recsys/thread_names.py names the batch
    threads and the exposure writer; gRPC core names its own); each process's first thread is
    :data:`MAIN_THREAD`, and Python threads left unnamed show as the process's name."""
    out: dict[str, float] = {}
    for process in (member for pid in pids for member in family(pid)):
        with contextlib.suppress(FileNotFoundError):  # a process or thread that just exited
            for task in Path(f"/proc/{process}/task").iterdir():
                with contextlib.suppress(FileNotFoundError):
                    name, seconds = stat_cpu(task / "stat")
                    key = MAIN_THREAD if int(task.name) == process else name
                    out[key] = out.get(key, 0.0) + seconds
    return out


def threads_per_call(
    before: dict[str, float], after: dict[str, float], calls: int
) -> dict[str, float]:
    """µs of each thread name's CPU per answered call between two :func:`thread_cpu` reads,
    largest first (names under 1 µs a call left out)."""
    per_call = {name: (after[name] - before.get(name, 0.0)) / max(calls, 1) * 1e6 for name in after}
    ranked = sorted(per_call.items(), key=lambda kv: -kv[1])
    return {name: round(us, 1) for name, us in ranked if us >= 1.0}


def make_requests(
    artifacts: Path, n: int, seed: int, kind: str, located_share: float = 1.0
) -> list[recommender_pb2.RecommendRequest]:
    world_dir = sorted((artifacts / "world").iterdir(), key=lambda p: p.stat().st_mtime)[-1]
    users = load_world(world_dir).users
    rng = np.random.default_rng(seed)
    out: list[recommender_pb2.RecommendRequest] = []
    if kind == "hit":  # one request repeated: every call after the first a cache hit
        # Each call with its own request id, as clients send them (the response carries it).
        for i in range(min(n, HIT_REQUEST_IDS)):
            req = recommender_pb2.RecommendRequest(
                user_id=str(users.user_ids[0]), num_results=20, request_id=f"h{i}"
            )
            req.location.lat = float(users.home_lat[0])
            req.location.lon = float(users.home_lon[0])
            out.append(req)
        return out
    if kind == "distinct":  # every request differs: no cache could help
        rows = rng.integers(0, users.n_users, size=n)
        for i, row in enumerate(rows.tolist()):
            req = recommender_pb2.RecommendRequest(
                user_id=str(users.user_ids[row]), num_results=20, request_id=f"d{i}"
            )
            if rng.random() < located_share:
                req.location.lat = float(users.home_lat[row]) + rng.normal(0, 0.01)
                req.location.lon = float(users.home_lon[row]) + rng.normal(0, 0.01)
            out.append(req)
        return out
    ranks = rng.zipf(ZIPF_EXPONENT, size=n)
    ranks = ranks[ranks <= users.n_users][: n // 2 + 1] - 1
    popularity_order = rng.permutation(users.n_users)
    visit = 0
    while len(out) < n:
        row = int(popularity_order[ranks[visit % ranks.size]])
        user = str(users.user_ids[row]) if rng.random() > 0.05 else f"new-{visit}"
        surface = "home" if rng.random() < 0.8 else "offers"
        located = rng.random() < located_share
        lat = float(users.home_lat[row]) + rng.normal(0, 0.003)
        lon = float(users.home_lon[row]) + rng.normal(0, 0.003)
        for _ in range(int(rng.integers(*REFRESHES_PER_VISIT))):
            req = recommender_pb2.RecommendRequest(
                user_id=user, num_results=20, surface=surface, request_id=f"m{len(out)}"
            )
            if located:
                req.location.lat, req.location.lon = lat, lon
            out.append(req)
        visit += 1
    # Visits interleave: refreshes of one visit spread over the next few hundred calls.
    order = np.argsort(np.arange(len(out)) + rng.uniform(0, 300, size=len(out)), kind="stable")
    return [out[i] for i in order[:n]]


@dataclass
class RequestStream:
    """The requests of one server's run, sent in order across its phases: the saturated phase
    continues where the warm-up stopped and the open loop where the saturated phase stopped, so
    a cache meets fresh traffic in each. ``wrapped``: the list ran out and started again (for
    the mix, every call after that repeats one the cache has seen; raise ``--requests``)."""

    requests: Sequence[recommender_pb2.RecommendRequest]
    position: int = 0

    @property
    def wrapped(self) -> bool:
        return self.position > len(self.requests)

    def next(self) -> recommender_pb2.RecommendRequest:
        request = self.requests[self.position % len(self.requests)]
        self.position += 1
        return request


async def wait_answering(target: str, seconds: float) -> None:
    request = recommender_pb2.RecommendRequest(user_id="warm-up", num_results=20)
    async with asyncio.timeout(seconds), grpc.aio.insecure_channel(target) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        while True:
            try:
                await stub.Recommend(request, timeout=5)
                return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.3)


@contextlib.asynccontextmanager
async def connected_stubs(
    target: str,
) -> AsyncIterator[list[recommender_pb2_grpc.RecommenderAsyncStub]]:
    """:data:`CHANNELS` stubs of ``target``, each on its own connection, closed on exit."""
    channels = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(CHANNELS)]
    try:
        yield [recommender_pb2_grpc.RecommenderStub(c) for c in channels]
    finally:
        for c in channels:
            await c.close(None)


async def closed_loop(
    target: str, requests: RequestStream, concurrency: int,
    seconds: float, on_response: Callable[[recommender_pb2.RecommendResponse], None] | None = None,
) -> tuple[list[float], dict[str, int]]:  # fmt: skip
    """``concurrency`` calls in flight for ``seconds``; ``on_response`` sees every answer."""
    latencies: list[float] = []
    codes: dict[str, int] = {}
    end = time.perf_counter() + seconds

    async def worker(stub: recommender_pb2_grpc.RecommenderAsyncStub) -> None:
        while time.perf_counter() < end:
            req = requests.next()
            start = time.perf_counter()
            try:
                response = await stub.Recommend(
                    req, timeout=10, metadata=user_metadata(req.user_id)
                )
                latencies.append(time.perf_counter() - start)
                if on_response is not None:
                    on_response(response)
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] = codes.get(e.code().name, 0) + 1

    async with connected_stubs(target) as stubs:
        await asyncio.gather(*(worker(stubs[n % CHANNELS]) for n in range(concurrency)))
    return latencies, codes


async def open_loop(
    target: str, requests: RequestStream, rate: float,
    seconds: float, on_response: Callable[[recommender_pb2.RecommendResponse], None] | None = None,
) -> tuple[list[float], dict[str, int], list[float]]:  # fmt: skip
    """Send at ``rate`` per second on schedule; latency counts from the scheduled time. Also
    returns how late each call was sent (the generator's own lag, inside those latencies)."""
    latencies: list[float] = []
    codes: dict[str, int] = {}
    send_lag: list[float] = []
    total = int(rate * seconds)

    async def one(
        stub: recommender_pb2_grpc.RecommenderAsyncStub,
        request: recommender_pb2.RecommendRequest,
        due: float,
    ) -> None:
        send_lag.append(time.perf_counter() - due)
        try:
            response = await stub.Recommend(
                request, timeout=10, metadata=user_metadata(request.user_id)
            )
            latencies.append(time.perf_counter() - due)
            if on_response is not None:
                on_response(response)
            codes["OK"] = codes.get("OK", 0) + 1
        except grpc.aio.AioRpcError as e:
            codes[e.code().name] = codes.get(e.code().name, 0) + 1

    tasks = []
    async with connected_stubs(target) as stubs:
        start = time.perf_counter()
        for n in range(total):
            due = start + n / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(stubs[n % CHANNELS], requests.next(), due)))
        await asyncio.gather(*tasks)
    return latencies, codes, send_lag


@dataclass
class Phase:
    """One phase's answered latencies (seconds), status codes by name and, in an open loop,
    each call's send lag (seconds late against its schedule)."""

    latencies: list[float]
    codes: dict[str, int]
    send_lag: list[float]
    timeline: dict[str, object] | None = None
    """The native generator's timeline of the phase (:func:`timeline`); None from Python's."""


def run_phase(
    generator: str,
    target: str,
    requests: RequestStream,
    seconds: float,
    *,
    calls: int | None = None,
    rate: float | None = None,
    request_file: Path | None = None,
) -> Phase:
    """A closed loop of ``calls`` in flight or an open loop at ``rate``, sent by ``generator``
    (``native``: the native generator over ``request_file``, the stream's requests as
    :func:`write_requests` wrote them, from the stream's position; ``python``: this process)."""
    if generator == "native":
        if request_file is None:
            raise ValueError("the native generator needs the request file")
        tally = run_native(
            target, request_file, seconds, rate=rate, clients=calls, channels=CHANNELS,
            first=requests.position % len(requests.requests),
        )  # fmt: skip
        requests.position += sum(tally.codes.values())
        return Phase(
            tally.answered,
            tally.codes,
            tally.send_lag,
            timeline(tally.answered, tally.answered_at, tally.not_ok_at),
        )
    if rate is not None:
        return Phase(*asyncio.run(open_loop(target, requests, rate, seconds)))
    if calls is None:
        raise ValueError("expected one of calls or rate")
    return Phase(*asyncio.run(closed_loop(target, requests, calls, seconds)), [])


def percentiles(latencies: list[float]) -> dict[str, float]:
    ms = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
    }


SHED_CODES = ("RESOURCE_EXHAUSTED", "CANCELLED")
"""The answers of refused calls: RESOURCE_EXHAUSTED from the servicer's admission, CANCELLED
from gRPC core's bound on calls waiting for the event loop (``--max-pending-rpcs``). The
client never cancels a call itself."""


def shed_share(codes: dict[str, int]) -> float:
    """Share of the calls refused (:data:`SHED_CODES`), whichever bound refused them."""
    total = sum(codes.values())
    shed = sum(codes.get(code, 0) for code in SHED_CODES)
    return round(shed / total, 4) if total else 0.0


Samples = list[tuple[str, dict[str, str], float]]
"""The samples of one read of a metrics page: (name, labels, value)."""


def metric_samples(command: list[str]) -> Samples:
    """Every sample on a recsys server's metrics page (name, labels, value); [] without one.
    Read once at each end of a phase; :func:`cache_lookups`, :func:`stage_totals` and
    :func:`bucket_totals` each take what they need from one read."""
    port = flag_value(command, "--metrics-port")
    if port is None:
        return []
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    except OSError:
        return []
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def cache_lookups(samples: Samples) -> tuple[float, float]:
    """(hits, misses) of a recsys server's result cache so far, from its metrics page."""
    counts = {"hit": 0.0, "miss": 0.0}
    for name, labels, value in samples:
        if name == "recsys_result_cache_lookups_total":
            counts[labels["result"]] += value
    return counts["hit"], counts["miss"]


def hit_rate(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    """The result cache's hit rate between two :func:`cache_lookups`; None: no lookups."""
    hits, misses = after[0] - before[0], after[1] - before[1]
    return round(hits / (hits + misses), 3) if hits + misses else None


GC_COLLECTED = "recsys_gc_collected_objects_total"
"""The objects the garbage collector freed (all generations): garbage in reference cycles."""


def gc_collected(samples: Samples) -> float | None:
    """The objects the garbage collector had freed so far, over every generation, from a
    recsys server's metrics page; None: the page does not count them."""
    counts = [value for name, _, value in samples if name == GC_COLLECTED]
    return sum(counts) if counts else None


TIMED_METRICS = {
    "recsys_batch_size": "batch",
    "recsys_batch_queue_delay_seconds": "queue_delay",
    "recsys_batch_run_seconds": "batch_run",
    "recsys_request_duration_seconds": "servicer",
    "recsys_gc_pause_seconds": "gc_pause",
}
"""Histograms read beside the stages' (metric name -> key): the batch size, each item's wait
for its batch, each batch's run, each call's time in the servicer, and each garbage-collection
pass (any generation: every thread of the process stalls for it)."""


def stage_totals(samples: Samples) -> dict[str, tuple[float, float]]:
    """(sum, count) of each stage's seconds and of :data:`TIMED_METRICS` so far, from a recsys
    server's metrics page: what :func:`stage_means` takes the difference of."""
    totals: dict[str, tuple[float, float]] = {}
    for name, labels, value in samples:
        if name.startswith("recsys_stage_duration_seconds_"):
            keys = [labels["stage"]]
        else:
            metric = name.rsplit("_", 1)[0]
            if metric not in TIMED_METRICS:
                continue
            keys = [TIMED_METRICS[metric]]
            if keys[0] == "gc_pause" and "generation" in labels:
                keys.append(f"gc_pause_g{labels['generation']}")
        for key in keys:
            seconds, runs = totals.get(key, (0.0, 0.0))
            if name.endswith("_sum"):
                totals[key] = (seconds + value, runs)
            elif name.endswith("_count"):
                totals[key] = (seconds, runs + value)
    return totals


TAIL_METRICS = ("servicer", "queue_delay", "batch_run", "gc_pause")
"""Of :data:`TIMED_METRICS`, those whose p99 over a phase is reported beside the mean."""


def bucket_totals(samples: Samples) -> dict[str, dict[float, float]]:
    """The cumulative bucket counts (upper bound -> calls so far) of each of
    :data:`TAIL_METRICS`, from a recsys server's metrics page, summed over labels."""
    totals: dict[str, dict[float, float]] = {}
    for name, labels, value in samples:
        metric, _, kind = name.rpartition("_")
        key = TIMED_METRICS.get(metric)
        if kind == "bucket" and key in TAIL_METRICS:
            bound = float(labels["le"])
            buckets = totals.setdefault(key, {})
            buckets[bound] = buckets.get(bound, 0.0) + value
    return totals


def quantile_between(
    before: dict[float, float], after: dict[float, float], q: float
) -> float | None:
    """The ``q`` quantile of what a histogram observed between two :func:`bucket_totals`, by
    linear interpolation within its bucket, as Prometheus's ``histogram_quantile`` does (the
    last finite bound when it falls in the +Inf bucket); None: nothing observed."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    at = next(n for n, count in enumerate(counts) if count >= rank)  # the last one at worst
    lower, below = (bounds[at - 1], counts[at - 1]) if at else (0.0, 0.0)
    if math.isinf(bounds[at]):
        return lower
    inside = counts[at] - below
    return lower + (bounds[at] - lower) * ((rank - below) / inside if inside else 1.0)


def tail_ms(
    before: dict[str, dict[float, float]], after: dict[str, dict[float, float]]
) -> dict[str, float]:
    """``{key}_p99_ms`` of each of :data:`TAIL_METRICS` between two :func:`bucket_totals`: the
    servicer's p99 (a call's own time in the server), an item's wait for its batch, a batch's
    run and a garbage-collection pass, to set beside the client's p99. As fine as the
    histograms' buckets (recsys/serving/metrics.py: bounds at 5, 10, 20, 30, 50, 75 ms ... for
    calls and batches; 5, 10, 20, 50 ms ... for the wait; 0.5, 1, 2, 5, 10, 20, 50 ms ... for a
    pass)."""
    out: dict[str, float] = {}
    for key in TAIL_METRICS:
        if key in after:
            value = quantile_between(before.get(key, {}), after[key], 0.99)
            if value is not None:
                out[f"{key}_p99_ms"] = round(value * 1e3, 3)
    return out


def stage_means(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], wall: float
) -> dict[str, float]:
    """Between two :func:`stage_totals` ``wall`` seconds apart: each stage's mean wall ms per
    run (a batched stage runs once per batch, a per-request one once per request), the mean
    batch size, the mean ms an item waited for its batch, a batch ran and a call spent in the
    servicer, and ``batch_busy``: seconds of batches run per second, summed over a server's
    workers (1.0: one batch thread never idle); of garbage collection, the mean ms a pass,
    ``gc_passes`` and ``gc_share`` (seconds of passes per second, summed over workers), and
    each generation's passes and mean ms (``gc_pause_g0_passes``, ``gc_pause_g0_ms``, ...)."""
    out: dict[str, float] = {}
    for key, (seconds, runs) in after.items():
        seconds0, runs0 = before.get(key, (0.0, 0.0))
        if key.startswith("gc_pause_g") and runs > runs0:
            out[f"{key}_passes"] = round(runs - runs0)
        if runs > runs0:
            mean = (seconds - seconds0) / (runs - runs0)
            out["mean_batch_size" if key == "batch" else f"{key}_ms"] = round(
                mean if key == "batch" else mean * 1e3, 3
            )
            if key == "batch_run" and wall > 0:
                out["batch_busy"] = round((seconds - seconds0) / wall, 3)
            if key == "gc_pause":
                out["gc_passes"] = round(runs - runs0)
                if wall > 0:
                    out["gc_share"] = round((seconds - seconds0) / wall, 4)
    return out


def phase_stages(before: Samples, after: Samples, wall: float, calls: int = 0) -> dict[str, float]:
    """A phase's :func:`stage_means` and :func:`tail_ms`, from the metrics page read at each
    end of it, ``wall`` seconds apart, and with the phase's ``calls`` answered, the objects
    the collector freed per call (``gc_collected_per_call``)."""
    out = stage_means(stage_totals(before), stage_totals(after), wall) | tail_ms(
        bucket_totals(before), bucket_totals(after)
    )
    freed = gc_collected(after)
    if calls and freed is not None:
        out["gc_collected_per_call"] = round((freed - (gc_collected(before) or 0.0)) / calls, 2)
    return out


def run_server(
    server: Server, args: argparse.Namespace, port: int, rate: float | None = None
) -> dict[str, object]:
    """Saturation, then the open loop at ``rate`` calls/s (None: ``--open-loop-share`` of the
    saturation, 70% by default)."""
    target = f"127.0.0.1:{port}"
    env = None
    if server.code is not None:  # the baseline's own recsys package, not this checkout's
        env = {**os.environ, "PYTHONPATH": str(server.code)}
    process = subprocess.Popen(
        pinned(args.server_cpus, server.command),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=server.code,
        env=env,
    )
    front_process = None
    config_dir = tempfile.TemporaryDirectory(prefix="bench-throughput-")
    try:
        if server.front is None:
            asyncio.run(wait_answering(target, 600))
        else:  # every worker answering on its own port, then the front before them
            command = server.command
            workers = workers_of(command)
            backends = tuple(Backend("127.0.0.1", port + n) for n in range(workers))
            for backend in backends:
                asyncio.run(wait_answering(f"127.0.0.1:{backend.port}", 600))
            front_process, target = start_bench_front(
                server.front, backends, Path(config_dir.name), args.server_cpus
            )
            asyncio.run(wait_answering(target, 60))

        def cpu_now() -> float:
            """The server's CPU seconds, its workers' and the front's (HAProxy) included."""
            front = 0.0 if front_process is None else cpu_seconds(front_process.pid)
            return children_cpu(process.pid) + front

        def threads_now() -> dict[str, float]:
            """:func:`cpu_now` by thread name."""
            front = [] if front_process is None else [front_process.pid]
            return thread_cpu([process.pid, *front])

        requests = RequestStream(
            make_requests(
                args.artifacts, args.requests, args.seed, server.requests, args.located_share
            )
        )
        request_file = None
        if server.generator == "native":
            request_file = Path(config_dir.name) / "requests.bin"
            write_requests(request_file, requests.requests)

        def phase(seconds: float, calls: int | None = None, rate: float | None = None) -> Phase:
            return run_phase(
                server.generator, target, requests, seconds,
                calls=calls, rate=rate, request_file=request_file,
            )  # fmt: skip

        # Warm-up (and, for the mix, the cache reaches its steady state on earlier traffic).
        calls = server.concurrency or args.concurrency
        phase(args.seconds / 3, calls=calls)
        metrics0 = metric_samples(server.command)
        threads0, cpu0, wall0 = threads_now(), cpu_now(), time.perf_counter()
        ticks0 = machine_ticks()
        saturated_phase = phase(args.seconds, calls=calls)
        steal = steal_share(ticks0, machine_ticks())
        latencies, codes = saturated_phase.latencies, saturated_phase.codes
        wall = time.perf_counter() - wall0
        cpu = cpu_now() - cpu0
        threads = threads_per_call(threads0, threads_now(), len(latencies))
        metrics = metric_samples(server.command)
        done = len(latencies)
        saturated = done / wall
        result: dict[str, object] = {
            "server": server.name,
            "generator": server.generator,
            "load": os.getloadavg()[0],
            "steal_share": steal,
            "requests_per_s": round(saturated, 1),
            "calls_in_flight": calls,
            **percentiles(latencies),
            "server_cpu_us_per_request": round(cpu / max(done, 1) * 1e6, 1),
            "shed_share": shed_share(codes),
            "requests_per_s_per_core": round(done / cpu, 1) if cpu else None,
            "codes": codes,
            "cache_hit_rate": hit_rate(cache_lookups(metrics0), cache_lookups(metrics)),
            "stages_saturated": phase_stages(metrics0, metrics, wall, done),
            "threads_us_per_call": threads,
            "requests_wrapped": requests.wrapped,
        }
        if args.open_loop:
            rate = args.open_loop_share * saturated if rate is None else rate
            metrics0 = metric_samples(server.command)
            threads0, cpu0, wall0 = threads_now(), cpu_now(), time.perf_counter()
            ticks0 = machine_ticks()
            open_phase = phase(args.seconds, rate=rate)
            steal70 = steal_share(ticks0, machine_ticks())
            lat70, codes70 = open_phase.latencies, open_phase.codes
            cpu70 = cpu_now() - cpu0
            threads70 = threads_per_call(threads0, threads_now(), len(lat70))
            metrics = metric_samples(server.command)
            stages70 = phase_stages(metrics0, metrics, time.perf_counter() - wall0, len(lat70))
            result["at_70pct"] = {  # the name of the default share, whatever the share
                "rate": round(rate, 1),
                "share_of_saturation": round(rate / saturated, 3) if saturated else None,
                "steal_share": steal70,
                **percentiles(lat70),
                "send_lag_p99_ms": percentiles(open_phase.send_lag)["p99_ms"],
                "timeline": open_phase.timeline,
                # Below saturation nothing is shed: every call's CPU is an answered call's.
                "server_cpu_us_per_request": round(cpu70 / max(len(lat70), 1) * 1e6, 1),
                "shed_share": shed_share(codes70),
                "codes": codes70,
                "cache_hit_rate": hit_rate(cache_lookups(metrics0), cache_lookups(metrics)),
                "stages": stages70,
                "threads_us_per_call": threads70,
                "requests_wrapped": requests.wrapped,
            }
        return result
    finally:
        if front_process is not None:
            stop(front_process)
        stop(process)
        config_dir.cleanup()


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM a server and wait for its drain; kill it if it has not stopped within a minute."""
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def cpu_per_call(result: dict[str, object]) -> float:
    value = result["server_cpu_us_per_request"]
    assert isinstance(value, int | float)
    return float(value)


def variant(text: str) -> tuple[str, list[str]]:
    """``NAME=FLAGS`` of ``--variant``: a server name suffix and the serve flags it adds."""
    name, sep, flags = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(
            f"--variant {text!r}: expected NAME=FLAGS with NAME a word, "
            "e.g. d2='--batch-max-delay-ms 2'"
        )
    return name, shlex.split(flags)


@dataclass(frozen=True)
class Fronted:
    """One ``--front``: the front's bounds, a name for its servers, the calls its closed loops
    keep in flight (None: ``--concurrency``)."""

    name: str
    settings: FrontSettings
    concurrency: int | None = None


def fronted(text: str) -> Fronted:
    """``IN_FLIGHT/QUEUE_MS[/QUEUED][:BALANCE][@CALLS]`` of ``--front``."""
    bounds, at, calls = text.partition("@")
    settings = front_bounds(bounds)
    if at and not (calls.isdigit() and int(calls) > 0):
        raise argparse.ArgumentTypeError(
            f"--front {text!r}: expected @CALLS a number of calls > 0, e.g. 6/1@12"
        )
    name = bounds.replace("/", "-").replace(":", "-")
    return Fronted(name, settings, int(calls) if at else None)


def flag_number(flag: str, text: str, ok: Callable[[float], bool], expected: str) -> float:
    """``text`` as a number ``ok`` accepts, or the argparse error naming ``flag``."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")  # accepted by no check below
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{flag} {text!r}: expected {expected}")
    return value


def open_loop_share(text: str) -> float:
    """``--open-loop-share``: a share of the saturated rate, above 0 and at most 1."""
    return flag_number("--open-loop-share", text, lambda v: 0 < v <= 1, "a number in (0, 1]")


def calls_per_second(text: str) -> float:
    """``--open-loop-rate``: a positive number of calls a second."""
    return flag_number(
        "--open-loop-rate", text, lambda v: 0 < v < math.inf, "a positive number of calls a second"
    )


def servers(args: argparse.Namespace, port: int) -> list[Server]:
    py = sys.executable
    art = str(args.artifacts.resolve())
    serve = [py, "-m", "recsys.cli.main", "serve", "--artifacts", art, "--port", str(port)]
    serve += ["--metrics-port", str(free_port()), *args.serve_arg]
    recsys = [
        Server("recsys-uncached", [*serve, "--cache-entries", "0"], "distinct"),
        Server("recsys-mix", serve, "mix"),
        Server("recsys-hit", serve, "hit"),
    ]
    same = args.same_rate

    def compared(server: Server, suffix: str, **changes: Any) -> Server:
        """A copy of ``server`` with ``changes``, named ``NAME-suffix``; with --same-rate it runs
        its open loop at the rate of ``server`` (or of what ``server`` itself is compared with)."""
        rate_of = (server.rate_of or server.name) if same else None
        return replace(server, name=f"{server.name}-{suffix}", rate_of=rate_of, **changes)

    if args.baseline is not None:  # each followed by the same server from another checkout
        code = args.baseline.resolve()
        recsys = followed_by(recsys, lambda r: [compared(r, "baseline", code=code)])
    if args.variant:  # each followed by the same server with other serve flags
        recsys = followed_by(
            recsys,
            lambda r: [
                compared(r, name, command=[*r.command, *flags]) for name, flags in args.variant
            ],
        )
    if args.front:  # each followed by the same server behind each front
        recsys = followed_by(
            recsys,
            lambda r: [
                compared(
                    r,
                    "front" if len(args.front) == 1 else f"front-{front.name}",
                    command=[*r.command, "--worker-port-stride", "1"],
                    front=front.settings,
                    concurrency=front.concurrency,
                )
                for front in args.front
            ],
        )
    recsys = [within_loop_bound(s, args.concurrency) for s in recsys]
    echo = [py, "-m", "benchmarks.echo_server", "--port", str(port)]
    listed = [
        Server("echo", echo, "distinct"),
        Server(
            "naive",
            [py, "-m", "benchmarks.naive_server", "--artifacts", art, "--port", str(port)],
            "distinct",
        ),
        *recsys,
        # A call's CPU depends on the rate (batches, loop wake-ups): the hit is set against
        # echo at the hit's own rate.
        *([Server(ECHO_AT_HIT, echo, "distinct", rate_of="recsys-hit")] if same else []),
    ]
    first, *others = args.generator or ["native"]
    return followed_by(  # each followed by the same server driven by each other generator
        [replace(s, generator=first) for s in listed],
        lambda s: [compared(s, other, generator=other) for other in others],
    )


def flag_value(command: Sequence[str], flag: str) -> str | None:
    """The value a server command gives ``flag`` (its last, as argparse reads it); None: not
    given."""
    at = [n for n, word in enumerate(command) if word == flag]
    return command[at[-1] + 1] if at else None


def workers_of(command: Sequence[str]) -> int:
    """The worker processes a server command starts (1 without ``--workers``)."""
    return int(flag_value(command, "--workers") or 1)


def within_loop_bound(server: Server, concurrency: int) -> Server:
    """``server`` with the hit's and the mix's closed loops kept within :data:`LOOP_CALLS` a
    worker; a server behind a front keeps the front's calls in flight."""
    if server.front is not None or server.requests not in ("hit", "mix"):
        return server
    return replace(server, concurrency=min(concurrency, workers_of(server.command) * LOOP_CALLS))


def followed_by(
    listed: Sequence[Server], copies: Callable[[Server], Sequence[Server]]
) -> list[Server]:
    """Each server of ``listed``, right after it the copies ``copies`` makes of it (the servers
    compared with it: :func:`in_turn` keeps them together)."""
    return [s for server in listed for s in (server, *copies(server))]


ECHO_AT_HIT = "echo-at-hit-rate"


def in_turn(listed: Sequence[Server], round_number: int) -> list[Server]:
    """The order one round runs ``listed`` in: as listed in even rounds; in odd rounds each
    server's comparisons (its baseline and variants, listed right after it) run before it, so
    that over two rounds every pair runs in both orders. The machine drifts within a run: in
    one comparison the server that ran second had the lower p99 at ~70% in all six pairs, and
    in an A/A run (the same code on both sides) the one that ran first did in all four
    (benchmarks/README.md, "Eighth round"). Alternating cancels a steady drift between the
    members of a pair."""
    out: list[Server] = []
    start = 0
    while start < len(listed):
        end = start + 1
        while end < len(listed) and listed[end].name.startswith(f"{listed[start].name}-"):
            end += 1
        group = list(listed[start:end])
        out.extend(reversed(group) if round_number % 2 else group)
        start = end
    return out


def open_loop_rate(
    server: Server,
    runs: dict[str, list[dict[str, object]]],
    ran: Sequence[Server],
    fixed: float | None = None,
) -> float | None:
    """The open-loop rate of ``server``'s run (None: 70% of its own saturation). ``fixed``
    (``--open-loop-rate``): every server's. With ``--same-rate`` a comparison runs at the
    latest rate of the server it is compared with. ``ran``: the servers run before it in this
    round; when a comparison of it is among them (an odd round of :func:`in_turn`), it takes
    its own previous rate, the one they ran at."""
    if fixed is not None:
        return fixed
    source = server.rate_of
    if source is None and any(s.rate_of == server.name for s in ran):
        source = server.name
    if source is None or not runs.get(source):
        return None
    phase = runs[source][-1].get("at_70pct")
    return float(phase["rate"]) if isinstance(phase, dict) else None


def same_rate_ratios(runs: dict[str, list[dict[str, object]]]) -> dict[str, float]:
    """Median CPU per call in the open-loop phase of each server run at another's rate, over
    that other's, in the same rounds: the like-for-like comparison (``--same-rate``). For
    echo at the hit's rate, the hit's CPU per call over echo's."""
    out = {}
    for name, results in runs.items():
        base = next((r.get("rate_of") for r in results if r.get("rate_of")), None)
        if not isinstance(base, str) or base not in runs:
            continue
        mine = [c for c in map(open_loop_cpu, results) if c is not None]
        theirs = [c for c in map(open_loop_cpu, runs[base]) if c is not None]
        if not mine or not theirs:
            continue
        if name == ECHO_AT_HIT:
            key, value = "recsys-hit_vs_echo", np.median(theirs) / np.median(mine)
        else:
            key, value = f"{name}_vs_{base}", np.median(mine) / np.median(theirs)
        out[f"{key}_cpu_per_call_same_rate"] = round(float(value), 3)
    return out


def open_loop_cpu(result: dict[str, object]) -> float | None:
    phase = result.get("at_70pct")
    if not isinstance(phase, dict):
        return None
    value = phase.get("server_cpu_us_per_request")
    return float(value) if isinstance(value, int | float) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument(
        "--requests",
        type=int,
        default=150_000,
        help="requests generated per server run; its phases send them in order, without "
        "repeating while they last (the hit case repeats its one request by design)",
    )
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", action="append", help="run only these servers")
    parser.add_argument("--no-open-loop", dest="open_loop", action="store_false")
    parser.add_argument(
        "--open-loop-share",
        type=open_loop_share,
        default=0.7,
        help="the open loop's rate as a share of the server's saturated rate, 0-1 (default "
        "%(default)s; reported under at_70pct whatever the share)",
    )
    parser.add_argument(
        "--open-loop-rate",
        type=calls_per_second,
        help="run every server's open loop at this many calls a second instead of a share of "
        "its own saturation (old and new code, or layouts, compared at one load; overrides "
        "--open-loop-share and --same-rate)",
    )
    parser.add_argument("--serve-arg", action="append", default=[], help="extra serve flag")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="also run the recsys servers from this checkout (old code, same requests and run)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        type=variant,
        default=[],
        metavar="NAME=FLAGS",
        help="also run each recsys server with these extra serve flags, right after it, as "
        "recsys-...-NAME (e.g. d2='--batch-max-delay-ms 2'; repeat for more)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the whole list of servers this many times (A B, then B A: in odd rounds each "
        "server's baseline and variants run before it, so each pair runs in both orders): on a "
        "shared machine, the spread between rounds shows how far one figure can be trusted",
    )
    parser.add_argument(
        "--same-rate",
        action="store_true",
        help="run each baseline and variant's open-loop phase at the rate of the server it is "
        f"compared with, and echo once more at recsys-hit's rate ({ECHO_AT_HIT}): CPU per call "
        "compared at equal load",
    )
    parser.add_argument(
        "--located-share",
        type=float,
        default=1.0,
        help="share of requests that carry a delivery location (default: all)",
    )
    parser.add_argument(
        "--front",
        type=fronted,
        action="append",
        default=[],
        metavar="IN_FLIGHT/QUEUE_MS[/QUEUED][:BALANCE][@CALLS]",
        help="also run each recsys server (and variant) behind the admission front "
        "(recsys/serving/front.py), right after it, as recsys-...-front (repeat for several: "
        "recsys-...-front-IN_FLIGHT-QUEUE_MS[-QUEUED][-BALANCE]); BALANCE: user (the default: "
        "by the calls' user header) or leastconn; @CALLS: its closed-loop phases keep "
        "CALLS in flight instead of --concurrency (e.g. workers x IN_FLIGHT, so that a tight "
        "front's saturation is not measured on refusals sent again)",
    )
    parser.add_argument(
        "--generator",
        choices=("native", "python"),
        action="append",
        help="what sends the calls: the native load generator (benchmarks/loadgen, built on "
        "first use; the default) or this process's event loop; a second one also runs each "
        "server again right after it, as NAME-python (or NAME-native), with that generator",
    )
    parser.add_argument(
        "--server-cpus",
        help="taskset CPU list for each server (e.g. 0); with --client-cpus the load generator "
        "runs apart from the server, as clients on other machines would",
    )
    parser.add_argument(
        "--client-cpus",
        help="CPU list for this process and the native generator it starts, the client (e.g. 1; "
        "comma-separated, no ranges)",
    )
    args = parser.parse_args()
    generators = args.generator or ["native"]
    if len(set(generators)) != len(generators):
        parser.error(f"--generator {' '.join(generators)}: expected each generator once")
    if "native" in generators:
        require_native(parser)
    if args.client_cpus and not args.server_cpus:
        parser.error("--client-cpus needs --server-cpus (the servers would inherit its CPUs)")
    if args.client_cpus:
        os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
    print(
        json.dumps(
            {
                "load_before": os.getloadavg(),
                "cpus": os.cpu_count(),
                "server_cpus": args.server_cpus,
                "client_cpus": args.client_cpus,
                "generators": generators,
            }
        ),
        flush=True,
    )
    runs: dict[str, list[dict[str, object]]] = {}
    for round_number in range(args.rounds):
        ran: list[Server] = []
        for server in in_turn(servers(args, free_port()), round_number):
            if args.only and server.name not in args.only:
                continue
            # A fresh port per server: the previous one may linger in TIME_WAIT.
            server = next(s for s in servers(args, free_port()) if s.name == server.name)
            port_text = flag_value(server.command, "--port")
            if port_text is None:
                raise RuntimeError(f"server {server.name}: its command gives no --port")
            port = int(port_text)
            rate = open_loop_rate(server, runs, ran, args.open_loop_rate)
            ran.append(server)
            result = {
                **run_server(server, args, port, rate),
                "round": round_number,
                "rate_of": server.rate_of,
            }
            runs.setdefault(server.name, []).append(result)
            print(json.dumps(result), flush=True)
    # With several rounds, the ratios compare each server's median CPU per call.
    cpu = {name: float(np.median([cpu_per_call(r) for r in rs])) for name, rs in runs.items()}
    ratios = {}
    for name in [k for k in cpu if k.startswith("recsys-")]:
        if "naive" in cpu:
            ratios[f"{name}_vs_naive_per_core"] = round(cpu["naive"] / cpu[name], 2)
        if "echo" in cpu:
            ratios[f"{name}_vs_echo_per_core"] = round(cpu["echo"] / cpu[name], 3)
            ratios[f"{name}_cpu_per_call_vs_echo"] = round(cpu[name] / cpu["echo"], 2)
    ratios.update(same_rate_ratios(runs))
    print(json.dumps({"ratios": ratios, "load_after": os.getloadavg()}), flush=True)


if __name__ == "__main__":
    main()
