"""How long until every server applies a new experiments version? Several processes, one Redis.

    .venv/bin/python benchmarks/control_propagation.py [--control redis://127.0.0.1:6379/0]
        [--servers 4] [--writes 20] [--layers 0 --experiments 0]

Starts ``--servers`` separate OS processes, each running the serving loop for the experiments
document (watch -> compile_config -> swap the reference: experiments.live.LiveAssigner), then
writes ``--writes`` new versions through the ops write path (re-salt rule, validation,
compare-and-set) and records, for every (write, process), the time from the start of the write
to the moment that process swapped the new snapshot in. All processes share this machine's clock.
With ``--layers``/``--experiments`` the document is the synthetic one of bench_assignment.py (a
bigger document to parse and compile). Keys live under a fresh prefix, deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, TextIO

import redis

from experiments import changes
from experiments.assignment import compile_config
from experiments.config import default_config, parse_config
from experiments.live import EXPERIMENTS_DOCUMENT, LiveAssigner
from experiments.synthetic import synthetic_config
from recsys.control.redis_store import RedisStore
from recsys.control.watch import watch


def follower(url: str, prefix: str, poll_seconds: float) -> None:
    """One 'server': apply every version, print when it was swapped in."""

    def report(assigner: Any) -> None:
        line = {"pid": os.getpid(), "version": int(assigner.version), "applied_at": time.time()}
        print(json.dumps(line), flush=True)

    async def run() -> None:
        live = LiveAssigner(compile_config(default_config(), version="0"), on_applied=report)
        watcher = watch(url, EXPERIMENTS_DOCUMENT, prefix=prefix, poll_seconds=poll_seconds)
        try:
            await live.follow(watcher)
        finally:
            await watcher.aclose()

    asyncio.run(run())


def _reader(stream: TextIO, out: queue.Queue[dict[str, Any]]) -> None:
    for line in stream:
        out.put(json.loads(line))


def _document(args: argparse.Namespace) -> dict[str, Any]:
    if args.layers:
        return synthetic_config(args.layers, args.experiments, coverage=0.5)
    return default_config()


def leader(args: argparse.Namespace) -> None:
    prefix = f"recsys-bench-{uuid.uuid4().hex[:12]}:"
    store = RedisStore(args.control, prefix=prefix)
    doc = _document(args)
    parse_config(doc)
    store.write(EXPERIMENTS_DOCUMENT, doc, expected_version=0, author="bench")
    reports: queue.Queue[dict[str, Any]] = queue.Queue()
    procs = []
    for _ in range(args.servers):
        proc = subprocess.Popen(
            [sys.executable, __file__, "--follower", "--control", args.control, "--prefix",
             prefix, "--poll-seconds", str(args.poll_seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert proc.stdout is not None
        threading.Thread(target=_reader, args=(proc.stdout, reports), daemon=True).start()
        procs.append(proc)
    try:
        applied: dict[int, dict[int, float]] = {}

        def wait_for(version: int, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while len(applied.get(version, {})) < args.servers:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    got = len(applied.get(version, {}))
                    raise SystemExit(f"version {version}: {got}/{args.servers} servers in time")
                try:
                    r = reports.get(timeout=remaining)
                except queue.Empty:
                    continue
                applied.setdefault(r["version"], {})[r["pid"]] = r["applied_at"]

        wait_for(1, timeout=60)  # every server up, following, on version 1
        started: dict[int, float] = {}
        experiment = "exp-1-0" if args.layers else "restaurant-cap"
        for i in range(args.writes):
            current = store.read(EXPERIMENTS_DOCUMENT)
            assert current is not None
            edited = changes.ramp(current.body, experiment, 10 + (i % 2) * 5)
            prepared = changes.prepare_write(current.body, edited)
            parse_config(prepared.doc)
            started[current.version + 1] = time.time()
            written = store.write(
                EXPERIMENTS_DOCUMENT, prepared.doc, expected_version=current.version, author="bench"
            )
            wait_for(written.version, timeout=30)
            time.sleep(args.interval)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)
        client = redis.Redis.from_url(args.control)
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()
        store.close()

    per_server = [(applied[v][pid] - t0) * 1e3 for v, t0 in started.items() for pid in applied[v]]
    all_servers = [(max(applied[v].values()) - t0) * 1e3 for v, t0 in started.items()]
    size = len(json.dumps(doc))
    print(
        f"{args.servers} server processes, {args.writes} writes, one Redis ({args.control}); "
        f"document {size / 1024:.0f} KiB; poll fallback {args.poll_seconds}s"
    )
    print(f"{'write start -> applied, ms':<34} {'p50':>8} {'p90':>8} {'max':>8}")
    for label, values in (("each server", per_server), ("slowest server", all_servers)):
        q = statistics.quantiles(values, n=10)
        print(f"{label:<34} {statistics.median(values):>8.1f} {q[8]:>8.1f} {max(values):>8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--control", default=os.environ.get("RECSYS_CONTROL") or "redis://127.0.0.1:6379/0"
    )
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--writes", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between writes")
    parser.add_argument("--poll-seconds", type=float, default=1.0)
    parser.add_argument("--layers", type=int, default=0)
    parser.add_argument("--experiments", type=int, default=0)
    parser.add_argument("--follower", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.follower:
        follower(args.control, args.prefix, args.poll_seconds)
    else:
        leader(args)


if __name__ == "__main__":
    main()
