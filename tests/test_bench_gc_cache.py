"""benchmarks/bench_gc_cache.py on the built test world: one real run of the command."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench_gc_cache import sizes_of

ROOT = Path(__file__).resolve().parents[1]


def test_each_size_reports_the_cache_the_tracked_objects_and_a_full_pass(
    artifacts_dir: Path,
) -> None:
    done = subprocess.run(
        [
            sys.executable, "-m", "benchmarks.bench_gc_cache", "--artifacts", str(artifacts_dir),
            "--entries", "0,300", "--passes", "1",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    empty, full = (json.loads(line) for line in done.stdout.strip().splitlines())
    assert empty["cached_answers"] == 0
    assert full["cached_answers"] >= 300
    assert full["requests_served"] >= full["cached_answers"]
    # Every cached answer holds objects the collector tracks, beyond what the empty cache had.
    assert full["tracked_objects"] - empty["tracked_objects"] >= full["cached_answers"]
    assert full["frozen_objects"] == empty["frozen_objects"] > 0  # the loaded heap, frozen
    assert empty["full_pass_ms"] > 0


@pytest.mark.parametrize("text", ["", "5,x", "-1", "10,-2"])
def test_sizes_must_be_counts(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="--entries"):
        sizes_of(text)


def test_sizes_read_a_comma_separated_list() -> None:
    assert sizes_of("0,5000,20000") == [0, 5000, 20000]
