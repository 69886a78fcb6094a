"""`recsys serve --workers N`: processes sharing the port, merged metrics, SIGTERM drains all."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from recsys.serving.workers import free_port, merge_families, worker_cpus
from recsys.v1 import recommender_pb2, recommender_pb2_grpc
from tests.serving.metrics_page import fetch_metrics, post_json

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


GAUGES = """# HELP recsys_control_plane_connected 1 while connected.
# TYPE recsys_control_plane_connected gauge
recsys_control_plane_connected{document="routing"} %s
# HELP recsys_requests_in_flight Calls being served now.
# TYPE recsys_requests_in_flight gauge
recsys_requests_in_flight %s
# HELP process_start_time_seconds Start time of the process.
# TYPE process_start_time_seconds gauge
process_start_time_seconds %s
"""


def _merged(*texts: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in merge_families(texts)
        for s in family.samples
    }


def test_merging_gauges_follows_their_mode() -> None:
    merged = _merged(GAUGES % (1.0, 3.0, 200.0), GAUGES % (1.0, 4.0, 100.0))
    connected = ("recsys_control_plane_connected", (("document", "routing"),))
    assert merged[connected] == 1.0  # not 2.0: a state, the lowest over workers
    assert merged[("recsys_requests_in_flight", ())] == 7.0  # an amount: summed
    assert merged[("process_start_time_seconds", ())] == 100.0  # the oldest process
    psi = '# TYPE recsys_drift_psi gauge\nrecsys_drift_psi{feature="score"} %s\n'
    assert _merged(psi % 0.1, psi % 0.3)[("recsys_drift_psi", (("feature", "score"),))] == 0.3
    merged = _merged(GAUGES % (1.0, 0.0, 1.0), GAUGES % (0.0, 0.0, 1.0))
    assert merged[connected] == 0.0  # one worker disconnected: the pod is not fully connected


def _metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return _samples(fetch_metrics(port))


def _start_workers(command: list[str], log: Path, metrics_port: int) -> subprocess.Popen[bytes]:
    """``command`` (a server of two workers) started, its stderr to ``log``, once both workers
    answer on the merged metrics endpoint (so every thread they start at first has started)."""
    with log.open("wb") as out:
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=out)
    deadline = time.monotonic() + 120
    while True:
        try:
            if _metrics(metrics_port).get(("recsys_workers", ())) == 2.0:
                return server
        except OSError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            server.wait()
            raise AssertionError(f"workers did not start: {log.read_text()}")
        time.sleep(0.3)


def test_two_workers_share_the_port_report_together_and_drain_on_sigterm(
    artifacts_dir: Path, tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    port, metrics_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    http_port = free_port("127.0.0.1")
    command = [
        sys.executable, "-m", "recsys.cli.main", "serve", "--artifacts", str(artifacts_dir),
        "--port", str(port), "--metrics-port", str(metrics_port), "--workers", "2",
        "--http-port", str(http_port), "--log-format", "json",
        "--exposure-dir", str(tmp_path / "exposures"),
    ]  # fmt: skip
    server = _start_workers(command, log, metrics_port)
    try:
        deadline = time.monotonic() + 120
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
        # The same call over HTTP/JSON, on the port the workers share too.
        status, body = post_json(http_port, {"userId": "user-0000042", "numResults": 5})
        assert status == 200, body
        assert len(body["items"]) == 5
        calls += 1
        time.sleep(0.2)
        page = fetch_metrics(metrics_port)
        samples = _samples(page)
        assert samples[("recsys_requests_total", (("code", "OK"),))] == calls
        # a state is not summed over the 2 workers; the pod's process series are there
        connected = [v for (n, _), v in samples.items() if n == "recsys_control_plane_connected"]
        assert connected, "no recsys_control_plane_connected series"
        assert set(connected) == {1.0}
        assert samples[("process_cpu_seconds_total", ())] > 0
        assert samples[("process_resident_memory_bytes", ())] > 0
        promtool = shutil.which("promtool")
        if promtool is not None:  # .ci/run installs it
            check = subprocess.run(
                [promtool, "check", "metrics"], input=page, capture_output=True, text=True
            )
            assert check.returncode == 0, check.stdout + check.stderr
        assert (
            _metrics(metrics_port)[("recsys_result_cache_lookups_total", (("result", "miss"),))]
            == calls
        )
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        lines = [json.loads(line) for line in log.read_text().splitlines()]  # one object each
        assert [e["message"] for e in lines].count("recsys stopped") == 2, lines
        assert {e["level"] for e in lines} >= {"INFO"}
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


@pytest.mark.parametrize(
    ("allowed", "workers", "pin", "cpus"),
    [
        ({3, 1}, 2, "auto", [1, 3]),  # exactly a CPU a worker: pinned, in order
        ({0, 1, 2, 3}, 2, "auto", [None, None]),  # a share of a larger set: not pinned
        ({0}, 2, "auto", [None, None]),
        ({0, 1, 2, 3}, 2, "on", [0, 1]),
        ({5, 7}, 3, "on", [5, 7, 5]),  # more workers than CPUs: in turn
        ({0, 1}, 2, "off", [None, None]),
    ],
)
def test_the_cpu_of_each_worker(
    allowed: set[int], workers: int, pin: str, cpus: list[int | None]
) -> None:
    assert worker_cpus(allowed, workers, pin) == cpus


def test_an_unknown_way_to_pin_is_refused() -> None:
    with pytest.raises(ValueError, match="pin is 'yes'; expected one of auto, on, off"):
        worker_cpus({0, 1}, 2, "yes")


def _workers(pid: int) -> list[int]:
    """The worker processes of server ``pid``: its children started by multiprocessing's spawn
    (not its resource tracker)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                command = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue  # ended meanwhile
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in command:
                out.append(int(entry))
    return out


def _thread_cpus(pid: int) -> set[frozenset[int]]:
    """The CPU sets of every thread of process ``pid``."""
    sets = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            sets.add(frozenset(os.sched_getaffinity(int(task))))
        except ProcessLookupError:
            continue  # a thread that ended meanwhile
    return sets


@pytest.mark.parametrize("pin", ["auto", "off"])
def test_workers_on_exactly_two_cpus_are_pinned_one_to_each_unless_told_not_to(
    artifacts_dir: Path, tmp_path: Path, pin: str
) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs two CPUs")
    two = set(allowed[:2])
    log = tmp_path / "serve.log"
    metrics_port = free_port("127.0.0.1")
    # The server may use exactly two CPUs, as in a pod given two of its own.
    command = [
        "taskset", "--cpu-list", ",".join(map(str, sorted(two))),
        sys.executable, "-m", "recsys.cli.main", "serve", "--artifacts", str(artifacts_dir),
        "--port", str(free_port("127.0.0.1")), "--metrics-port", str(metrics_port),
        "--workers", "2", "--pin-workers", pin, "--exposure-dir", str(tmp_path / "exposures"),
    ]  # fmt: skip
    server = _start_workers(command, log, metrics_port)
    try:
        workers = _workers(server.pid)
        assert len(workers) == 2, workers
        cpus = [_thread_cpus(w) for w in workers]
        if pin == "off":
            assert cpus == [{frozenset(two)}] * 2
        else:  # every thread of a worker on one CPU, a CPU each
            assert sorted(cpus, key=sorted) == [{frozenset({c})} for c in sorted(two)]
            a, b = sorted(two)  # worker n on the n-th CPU of the set
            assert f"on CPUs 0: {a}, 1: {b}" in log.read_text()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
