"""benchmarks/bench_routing.py on the built test world: the serving code's caches, fed the
throughput benchmark's mix, routed by user or spread."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench_routing import caches_hit_rate, requests_of
from benchmarks.bench_throughput import make_requests
from recsys.serving.cache import cache_key
from recsys.types import Request

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mix(artifacts_dir: Path) -> list[Request]:
    return requests_of(make_requests(artifacts_dir, 4_000, 1, "mix"))


def one_cache_rate(requests: list[Request]) -> float:
    """The hit rate of one unbounded cache, counted here without the benchmark's code."""
    seen: set[object] = set()
    hits = 0
    for request in requests:
        key = cache_key(request)
        hits += key in seen
        seen.add(key)
    return hits / len(requests)


def test_routed_by_user_every_process_count_keeps_one_cache_s_hit_rate(mix: list[Request]) -> None:
    single = one_cache_rate(mix)
    assert 0.3 < single < 1.0  # the mix refreshes feeds, and not only
    for processes in (1, 2, 7, 64):
        assert caches_hit_rate(mix, processes, "user", entries=100_000, seed=1) == pytest.approx(
            single
        )


def test_spread_over_processes_the_hit_rate_falls_with_their_number(mix: list[Request]) -> None:
    rates = [caches_hit_rate(mix, n, "spread", entries=100_000, seed=1) for n in (1, 2, 8, 64)]
    assert rates[0] == pytest.approx(one_cache_rate(mix))
    assert rates == sorted(rates, reverse=True)
    assert rates[-1] < rates[0] / 4


def test_a_cache_s_bound_costs_hits(mix: list[Request]) -> None:
    assert caches_hit_rate(mix, 1, "user", entries=10, seed=1) < caches_hit_rate(
        mix, 1, "user", 100_000, 1
    )


def test_the_command_prints_a_row_per_process_count(artifacts_dir: Path) -> None:
    command = [
        sys.executable, "-m", "benchmarks.bench_routing", "--artifacts", str(artifacts_dir),
        "--requests", "2000", "--processes", "1", "4",
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, check=True, timeout=300
    )
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["processes"] for r in rows] == [1, 4]
    assert rows[0]["hit_rate_user"] == rows[0]["hit_rate_spread"]
    assert rows[1]["hit_rate_user"] == rows[0]["hit_rate_user"] > rows[1]["hit_rate_spread"]


def test_bad_flags_are_one_line(artifacts_dir: Path) -> None:
    command = [sys.executable, "-m", "benchmarks.bench_routing", "--processes", "0"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--processes [0]: expected each >= 1" in done.stderr
