"""benchmarks/bench_overload.py on the built test world: one short real run, a server alone and
the same server behind the admission front (real HAProxy), every phase against a real server
with its control plane in a real Redis."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.control.redis_helpers import redis_url  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parents[1]


def bench_keys(url: str) -> set[bytes]:
    client = redis.Redis.from_url(url)
    try:
        return set(client.scan_iter(match="bench-overload-*", count=1000))
    finally:
        client.close()


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed (CI has it)")
def test_each_configuration_runs_every_phase_at_one_offered_rate(
    artifacts_dir: Path,
    redis_url: str,  # noqa: F811 - the fixture
) -> None:
    before = bench_keys(redis_url)
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_overload", "--artifacts", str(artifacts_dir),
         "--control", redis_url, "--seconds", "1", "--promotions", "3",
         "--promotion-interval", "0.2", "--saturate-clients", "4", "--overload", "2",
         "--no-echo", "--generator", "python", "--config", "alone=", "--config", "front=",
         "--front", "front=8/2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    out = json.loads(done.stdout)
    results = out["results"]
    assert list(results) == ["alone", "front"]
    offered = {name: r["overload"]["offered_per_s"] for name, r in results.items()}
    # Every configuration gets twice the first one's measured capacity.
    assert (
        offered["alone"]
        == offered["front"]
        == round(2 * results["alone"]["overload"]["capacity_per_s"], 1)
    )
    for name, result in results.items():
        light = result["light_load"]
        assert light["promotions"] == 3
        assert light["calls"] == sum(light["codes"].values()) > 0
        assert light["sheds"] == light["codes"].get("RESOURCE_EXHAUSTED", 0)
        over = result["overload"]
        calls = sum(over["codes"].values())
        assert calls > 0
        assert over["admitted_per_s"] == round(over["codes"].get("OK", 0) / 1.0, 1)
        assert over["admitted_p99_ms"] > 0
        assert over["unloaded_p99_ms"] > 0
        assert over["admitted_p99_over_unloaded_p99"] == round(
            over["admitted_p99_ms"] / over["unloaded_p99_ms"], 2
        )
        assert over["cpu_seconds"]["server"] > 0
        # The front's own CPU is measured only where there is a front.
        assert (over["front_cpu_us_per_offered"] is None) == (name == "alone")
    assert [line.split(":")[0] for line in out["side_by_side"]] == ["alone", "front"]
    assert bench_keys(redis_url) == before  # its control documents are removed at the end
