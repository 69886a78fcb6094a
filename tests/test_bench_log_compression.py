"""benchmarks/bench_log_compression.py, one real run: each mode in a process of its own, the
server's own writer compressing (or not) the files it rotates beside the serving threads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_each_mode_serves_every_call_and_compresses_as_the_mode_says() -> None:
    command = [
        sys.executable, "-m", "benchmarks.bench_log_compression", "--rounds", "1",
        "--seconds", "2", "--rate", "100", "--file-mib", "1", "--every", "0.4",
        "--iteration-ns", "20",
    ]  # fmt: skip
    out = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
    *rows, summary = [json.loads(line) for line in out.stdout.splitlines()]
    by_mode = {row["mode"]: row for row in rows}
    assert sorted(by_mode) == ["inline", "none", "thread"]
    (calls,) = {row["calls"] for row in rows}  # the same Poisson arrivals in every mode
    assert calls > 100
    assert by_mode["none"]["files_compressed"] == 0  # never rotated
    for mode in ("inline", "thread"):
        assert by_mode[mode]["files_compressed"] >= 1, mode
        row = by_mode[mode]
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["p999_ms"] <= row["max_ms"]
    medians = summary["median_over_rounds"]
    assert medians["none"]["p99_ms_vs_none"] == 1.0
    assert medians["thread"]["p99_ms"] == by_mode["thread"]["p99_ms"]  # one round: its own
