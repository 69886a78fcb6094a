"""Does the exposure log's background compression delay the serving threads? One CPU, in process.

Each mode runs in a process of its own pinned to one CPU (``--cpu``), as one worker is. Two
threads stand for a worker's serving threads: an arrival thread (the event loop) runs
``--loop-us`` of Python for each call arriving at ``--rate`` a second (Poisson) and queues it;
a batch thread takes every queued call at once and runs ``--batch-us`` of Python a call, then
answers them. A call's latency runs from when it was due to its answer. Beside them the
server's own :class:`~recsys.linelog.files.RotatingFileWriter` writes a ``--file-mib`` MiB file of
exposure-like lines every ``--every`` seconds (from a writer thread, as the server's exposure
writer does: batches of 256 lines, evenly spaced) and rotates it; what happens to the closed
file is the mode:

- ``none``: nothing (the writer never rotates: the same writes, no compression);
- ``inline``: compressed in the writer thread at the serving threads' priority (the server
  before benchmarks/README.md's "Twentieth round");
- ``thread``: compressed by the writer's ``log-compress`` thread at nice 19 (that round, and
  the server today).

A fourth mode, a child process at nice 19 that the ``log-compress`` thread started and waited
for (no interpreter lock shared with the serving threads), was measured here and not kept: its
calls' p99 was higher than the thread's in 7 of 8 rounds (benchmarks/README.md,
"Twenty-first round").

The modes run in turn, ``--rounds`` times, the order reversed every other round. Prints a JSON
line per mode and round (latency p50 / p99 / p99.9 / max in ms, calls, files compressed by the
end of the run) and then each mode's median p99 and p99.9 over the rounds, and their ratios to
``none``.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from recsys.linelog import files as linelog_files

MODES = ("none", "inline", "thread")
LINES_PER_BATCH = 256


def iteration_ns() -> float:
    """ns an empty Python loop iteration takes here: the fastest of five tries (the others
    include what else ran on the CPU)."""
    tries = []
    for _ in range(5):
        n = 500_000
        start = time.thread_time()
        for _ in range(n):
            pass
        tries.append((time.thread_time() - start) / n * 1e9)
    return min(tries)


def spin(iterations: int) -> None:
    for _ in range(iterations):
        pass


def exposure_lines(mib: float, seed: int) -> list[str]:
    """Lines of about 2.2 kB like the exposure log's (ids, 20 items, float features)."""
    rng = np.random.default_rng(seed)
    lines: list[str] = []
    size = 0
    while size < mib * (1 << 20):
        record = {
            "request_id": f"r{len(lines)}",
            "user_id": str(int(rng.integers(0, 1_000_000))),
            "items": [int(i) for i in rng.integers(0, 4_000_000, size=20)],
            "scores": [float(s) for s in rng.random(20)],
            "features": [float(f) for f in rng.normal(size=60)],
        }
        text = json.dumps(record) + "\n"
        lines.append(text)
        size += len(text)
    return lines


def run_mode(args: argparse.Namespace) -> dict[str, object]:
    """One mode, in this process (pinned to ``--cpu``)."""
    os.sched_setaffinity(0, {args.cpu})
    lines = exposure_lines(args.file_mib, args.seed)
    file_bytes = sum(len(line) for line in lines)
    loop_n = max(1, round(args.loop_us * 1e3 / args.iteration_ns))
    batch_n = max(1, round(args.batch_us * 1e3 / args.iteration_ns))
    directory = Path(tempfile.mkdtemp(prefix="bench-log-compression-"))
    writer = linelog_files.RotatingFileWriter(
        directory,
        max_bytes=file_bytes if args.mode != "none" else 1 << 62,
        compress_in_background=args.mode == "thread",
    )
    stop = threading.Event()
    calls: queue.SimpleQueue[float | None] = queue.SimpleQueue()
    latencies: list[float] = []

    batches = [lines[i : i + LINES_PER_BATCH] for i in range(0, len(lines), LINES_PER_BATCH)]

    def write_files() -> None:
        """A file's batches evenly over ``--every`` seconds, again and again."""
        pause = args.every / len(batches)
        next_batch = time.perf_counter()
        while True:
            for batch in batches:
                next_batch += pause
                if stop.wait(max(0.0, next_batch - time.perf_counter())):
                    return
                writer.write_lines(batch)

    def batch_thread() -> None:
        while True:
            due = [calls.get()]
            while not calls.empty():
                due.append(calls.get())
            for _ in due:
                spin(batch_n)
            done = time.perf_counter()
            latencies.extend(done - d for d in due if d is not None)
            if None in due:
                return

    writing = threading.Thread(target=write_files, name="exposure-writer")
    batching = threading.Thread(target=batch_thread, name="batch-recommend")
    writing.start()
    batching.start()
    rng = np.random.default_rng(args.seed)
    begin = time.perf_counter()
    due = begin
    end = begin + args.seconds
    while due < end:
        due += float(rng.exponential(1 / args.rate))
        pause = due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        spin(loop_n)
        calls.put(due)
    calls.put(None)
    batching.join()
    stop.set()
    writing.join()
    compressed = len(list(directory.glob("*.jsonl.gz")))
    writer.close()
    shutil.rmtree(directory)
    ms = np.array(latencies) * 1e3
    return {
        "mode": args.mode,
        "calls": len(latencies),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "p999_ms": round(float(np.percentile(ms, 99.9)), 2),
        "max_ms": round(float(ms.max()), 2),
        "files_compressed": compressed,
        "file_mib": round(file_bytes / (1 << 20), 1),
        "python_iteration_ns": round(args.iteration_ns, 2),
        "load": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, help="run this one mode here and print it")
    parser.add_argument("--only", action="append", choices=MODES, help="run only these modes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--rate", type=float, default=500.0, help="calls a second")
    parser.add_argument("--loop-us", type=float, default=200.0)
    parser.add_argument("--batch-us", type=float, default=600.0)
    parser.add_argument("--file-mib", type=float, default=64.0)
    parser.add_argument("--every", type=float, default=4.0, help="seconds between two files")
    parser.add_argument("--cpu", type=int, default=0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--iteration-ns",
        type=float,
        help="ns a Python loop iteration takes (default: measured once, before the modes run, "
        "so that every mode runs the same work)",
    )
    args = parser.parse_args()
    if args.iteration_ns is None:
        os.sched_setaffinity(0, {args.cpu})
        args.iteration_ns = iteration_ns()
    if args.mode is not None:
        print(json.dumps(run_mode(args)), flush=True)
        return
    modes = args.only or list(MODES)
    flags = [
        f"--{name.replace('_', '-')}={getattr(args, name)}"
        for name in (
            "seconds",
            "rate",
            "loop_us",
            "batch_us",
            "file_mib",
            "every",
            "cpu",
            "seed",
            "iteration_ns",
        )
    ]
    results: dict[str, list[dict[str, object]]] = {}
    for round_number in range(args.rounds):
        for mode in modes if round_number % 2 == 0 else modes[::-1]:
            command = [sys.executable, "-m", "benchmarks.bench_log_compression", *flags]
            out = subprocess.run([*command, "--mode", mode], check=True, capture_output=True)
            result = {**json.loads(out.stdout), "round": round_number}
            results.setdefault(mode, []).append(result)
            print(json.dumps(result), flush=True)
    summary: dict[str, dict[str, float]] = {}
    for mode, rows in results.items():
        summary[mode] = {
            key: float(np.median([float(r[key]) for r in rows]))  # type: ignore[arg-type]
            for key in ("p99_ms", "p999_ms", "max_ms")
        }
    if "none" in summary:
        for mode in summary:
            for key in ("p99_ms", "p999_ms"):
                ratio = summary[mode][key] / summary["none"][key]
                summary[mode][f"{key}_vs_none"] = round(ratio, 2)
    print(json.dumps({"median_over_rounds": summary}), flush=True)


if __name__ == "__main__":
    main()
