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
            "--entries", "0,300,1500", "--passes", "3",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    empty, some, more = (json.loads(line) for line in done.stdout.strip().splitlines())
    assert empty["cached_answers"] == 0
    assert some["cached_answers"] >= 300
    assert more["cached_answers"] >= 1500
    assert more["requests_served"] >= more["cached_answers"]
    # Cached answers are kept untracked (serving/cache.py): 1,200 more answers add fewer
    # tracked objects than answers (kept as built, each added about eight).
    added = more["cached_answers"] - some["cached_answers"]
    assert more["tracked_objects"] - some["tracked_objects"] < added
    assert more["frozen_objects"] == empty["frozen_objects"] > 0  # the loaded heap, frozen
    assert empty["full_pass_ms"] > 0


@pytest.mark.parametrize("text", ["", "5,x", "-1", "10,-2"])
def test_sizes_must_be_counts(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="--entries"):
        sizes_of(text)


def test_sizes_read_a_comma_separated_list() -> None:
    assert sizes_of("0,5000,20000") == [0, 5000, 20000]
