"""`recsys serve --workers N`: processes sharing the port, merged metrics, SIGTERM drains all."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from recsys.serving.workers import free_port, merge_families
from recsys.v1 import recommender_pb2, recommender_pb2_grpc
from tests.serving.metrics_page import fetch_metrics

WORKER_A = """# HELP recsys_requests Recommend calls.
# TYPE recsys_requests counter
recsys_requests_total{code="OK"} 3.0
recsys_requests_created{code="OK"} 1.7e9
# HELP recsys_index FAISS index version serving.
# TYPE recsys_index_info gauge
recsys_index_info{version="i1"} 1.0
# HELP recsys_batch_size Items per micro-batch.
# TYPE recsys_batch_size histogram
recsys_batch_size_bucket{batcher="recommend",le="1.0"} 2.0
recsys_batch_size_bucket{batcher="recommend",le="+Inf"} 3.0
recsys_batch_size_count{batcher="recommend"} 3.0
recsys_batch_size_sum{batcher="recommend"} 5.0
"""
WORKER_B = WORKER_A.replace(" 3.0", " 4.0").replace("} 2.0", "} 1.0")


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_merging_sums_counters_and_histograms_and_keeps_info_series_once() -> None:
    merged = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in merge_families([WORKER_A, WORKER_B])
        for s in family.samples
    }
    a, b = _samples(WORKER_A), _samples(WORKER_B)
    ok = ("recsys_requests_total", (("code", "OK"),))
    assert merged[ok] == a[ok] + b[ok] == 7.0
    bucket = ("recsys_batch_size_bucket", (("batcher", "recommend"), ("le", "1.0")))
    assert merged[bucket] == 3.0
    assert merged[("recsys_index_info", (("version", "i1"),))] == 1.0
    assert not any(name.endswith("_created") for name, _ in merged)


def _metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return _samples(fetch_metrics(port))


def test_two_workers_share_the_port_report_together_and_drain_on_sigterm(
    artifacts_dir: Path, tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    port, metrics_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    command = [
        sys.executable, "-m", "recsys.cli.main", "serve", "--artifacts", str(artifacts_dir),
        "--port", str(port), "--metrics-port", str(metrics_port), "--workers", "2",
    ]  # fmt: skip
    with log.open("wb") as out:
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=out)
    try:
        deadline = time.monotonic() + 120
        while True:  # both workers up: the merged endpoint counts them
            try:
                if _metrics(metrics_port).get(("recsys_workers", ())) == 2.0:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "workers did not start"
            assert server.poll() is None, log.read_text()
            time.sleep(0.3)
        target = f"127.0.0.1:{port}"
        while True:  # a worker listens only once it serves, so nothing answers UNAVAILABLE
            with grpc.insecure_channel(target) as channel:
                try:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=10
                    )
                except grpc.RpcError:  # connection refused: no worker listens yet
                    reply = None
            if reply is not None:
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                break
            assert time.monotonic() < deadline, "no worker started serving"
            time.sleep(0.3)
        calls = 12
        for n in range(calls):  # a channel per call: the kernel spreads the connections
            with grpc.insecure_channel(target) as channel:
                stub = recommender_pb2_grpc.RecommenderStub(channel)
                request = recommender_pb2.RecommendRequest(user_id=f"user-{n:07d}")
                assert len(stub.Recommend(request, timeout=30).items) == 20
        time.sleep(0.2)
        assert _metrics(metrics_port)[("recsys_requests_total", (("code", "OK"),))] == calls
        assert (
            _metrics(metrics_port)[("recsys_result_cache_lookups_total", (("result", "miss"),))]
            == calls
        )
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        assert log.read_text().count("recsys stopped") == 2, log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
