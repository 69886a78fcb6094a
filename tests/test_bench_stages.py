"""benchmarks/bench_stages.py on the built test world: where its requests come from, and one
real run of the command with its new flags."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_rank_cut import load_state
from benchmarks.bench_stages import LoopThread, after_a_pause, make_requests
from recsys.stage import Batch
from recsys.types import Request

ROOT = Path(__file__).resolve().parents[1]


def test_requests_come_from_one_place_or_from_around_each_users_home(artifacts_dir: Path) -> None:
    snapshot = load_state(artifacts_dir)
    tables = snapshot.tables
    one = make_requests(snapshot, 50, "one")
    assert {(r.location.lat, r.location.lon) for r in one if r.location} == {(52.52, 13.40)}
    homes = make_requests(snapshot, 50, "homes")
    assert [r.user_id for r in homes] == [str(u) for u in tables.user_ids[:50]]
    lat = np.array([r.location.lat for r in homes if r.location])
    lon = np.array([r.location.lon for r in homes if r.location])
    assert lat.size == lon.size == 50
    # around each home (0.01 degrees apart at most ~5 sigma), and not all in one place
    assert np.abs(lat - np.asarray(tables.user_home_lat[:50])).max() < 0.05
    assert np.abs(lon - np.asarray(tables.user_home_lon[:50])).max() < 0.05
    assert len(set(zip(lat.tolist(), lon.tolist(), strict=True))) == 50


def run_report(artifacts_dir: Path, requests: int, *flags: str) -> dict[str, Any]:
    """The JSON line of one real run of the command on ``requests`` in batches of 4."""
    done = subprocess.run(
        [
            sys.executable, "-m", "benchmarks.bench_stages", "--artifacts", str(artifacts_dir),
            "--requests", str(requests), "--batch", "4", "--places", "homes", *flags,
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def test_the_command_reports_each_stage_and_the_process_cpu(artifacts_dir: Path) -> None:
    report = run_report(artifacts_dir, 16, "--rounds", "1", "--search-threads", "1")
    assert report["places"] == "homes"
    assert report["search_threads"] == 1
    assert report["batch"] == 4
    assert report["process_cpu_us_per_request_median"] > 0
    stages = report["us_per_request_median"]
    assert {"assign", "features", "retrieve", "rank", "arrange", "monitor"} <= set(stages)
    assert all(v >= 0 for v in stages.values())


def test_beside_a_loop_thread_reports_both_runs_and_their_ratios(artifacts_dir: Path) -> None:
    report = run_report(artifacts_dir, 48, "--rounds", "2", "--loop-thread", "200/100")
    report = report["loop_thread"]
    assert (report["busy_us"], report["idle_us"]) == (200.0, 100.0)
    # What the second thread got of the lock and the cores is the machine's to decide (a
    # thread starved of a core takes none of it), so only its bounds are certain.
    assert 0 <= report["loop_busy_share"] < 1
    for run in ("alone", "beside"):
        assert set(report[run]) == {"cpu_us", "system_us", "switches", "wall_us"}
        assert report[run]["wall_us"] > 0
        assert report[run]["cpu_us"] > 0
        assert 0 <= report[run]["system_us"] <= report[run]["cpu_us"]
    assert report["wall_us_beside_over_alone"] > 0
    assert report["cpu_us_beside_over_alone"] > 0


def refusal(*flags: str) -> str:
    """The last line the command prints when it refuses ``flags`` (exit code 2)."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_stages", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    return done.stderr.strip().splitlines()[-1]


def test_a_bad_loop_thread_duty_is_one_line() -> None:
    assert refusal("--loop-thread", "0/300").endswith(
        "argument --loop-thread: '0/300': expected BUSY_US/IDLE_US, microseconds, busy > 0 "
        "and idle >= 0 (e.g. 200/200)"
    )


def test_the_loop_thread_takes_turns_while_this_thread_runs_python() -> None:
    """Its busy turns add up while another thread runs Python (it takes the interpreter lock
    from it), and it stops when the block ends."""
    with LoopThread(busy=0.001, idle=0.001) as loop:
        first = loop.held
        assert first >= 0.001  # one whole busy turn before the block starts
        give_up = time.monotonic() + 30
        while loop.held < first + 0.005 and time.monotonic() < give_up:
            sum(range(1000))  # Python, holding the lock between switches
        assert loop.held >= first + 0.005
    stopped = loop.held
    time.sleep(0.05)
    assert loop.held == stopped


def test_after_a_pause_reports_both_runs_by_stage(artifacts_dir: Path) -> None:
    report = run_report(artifacts_dir, 24, "--rounds", "2", "--idle-ms", "2")["idle"]
    assert report["pause_ms"] == 2.0
    for run in ("back_to_back", "after_a_pause"):
        assert {"cpu_us", "assign_us", "retrieve_us", "rank_us", "monitor_us"} <= set(report[run])
        assert report[run]["cpu_us"] > 0
        assert report[run]["retrieve_us"] > 0
    assert report["cpu_us_after_a_pause_over_back_to_back"] > 0


def test_arrange_paths_reports_both_ways_and_their_ratio(artifacts_dir: Path) -> None:
    report = run_report(artifacts_dir, 24, "--rounds", "2", "--arrange-paths")["arrange_paths"]
    assert report["one_by_one"]["wall_us"] > 0
    assert report["batch"]["wall_us"] > 0
    assert report["wall_us_batch_over_one_by_one"] > 0


class Clock:
    """A stage that notes when each batch reaches it."""

    name = "clock"

    def __init__(self) -> None:
        self.times: list[float] = []

    def run(self, batch: Batch, snapshot: object) -> Batch:
        self.times.append(time.perf_counter())
        return batch


def test_only_the_paused_runs_sleep_before_each_batch() -> None:
    clock = Clock()
    requests = [Request(f"r{i}", f"u{i}", 20) for i in range(6)]
    report = after_a_pause([clock], None, requests, 2, rounds=1, pause=0.2)
    back_to_back = report["back_to_back"]
    assert isinstance(back_to_back, dict)
    assert set(back_to_back) == {"cpu_us", "clock_us"}
    # Two rounds (one to warm up), each a run of 3 batches back to back, then a paused one.
    assert len(clock.times) == 12
    runs = [clock.times[i : i + 3] for i in range(0, 12, 3)]
    for run, paused in zip(runs, (False, True, True, False), strict=True):
        gaps = [b - a for a, b in itertools.pairwise(run)]
        assert all(g >= 0.2 for g in gaps) if paused else all(g < 0.2 for g in gaps)


def test_a_bad_pause_is_one_line() -> None:
    assert refusal("--idle-ms", "0").endswith(
        "argument --idle-ms: '0': expected milliseconds > 0 (e.g. 8)"
    )
