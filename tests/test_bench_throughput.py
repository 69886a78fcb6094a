"""The throughput benchmark's server list: variants and baselines are the same servers with
other flags or code, each right after the one it is compared with."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from benchmarks import bench_throughput
from benchmarks.bench_latency import front_bounds, pinned
from benchmarks.bench_throughput import (
    CHANNELS,
    ECHO_AT_HIT,
    LOOP_CALLS,
    RequestStream,
    bucket_totals,
    cache_lookups,
    calls_per_second,
    closed_loop,
    flag_value,
    fronted,
    gc_collected,
    hit_rate,
    in_turn,
    metric_samples,
    open_loop_rate,
    open_loop_share,
    phase_stages,
    quantile_between,
    run_phase,
    same_rate_ratios,
    servers,
    shed_share,
    stage_means,
    stage_totals,
    tail_ms,
    thread_cpu,
    threads_per_call,
    variant,
)
from benchmarks.load_generator import write_requests
from recsys.serving.batching import BatchStats
from recsys.serving.metrics import ServingMetrics
from recsys.settings import ServeSettings
from recsys.v1 import recommender_pb2, recommender_pb2_grpc


def args(
    *,
    variants: list[str],
    baseline: Path | None = None,
    same_rate: bool = False,
    fronts: tuple[str, ...] = (),
    generators: tuple[str, ...] = (),
    concurrency: int = 64,
) -> argparse.Namespace:
    return argparse.Namespace(
        artifacts=Path("/tmp/art"),
        concurrency=concurrency,
        serve_arg=["--batch-max-size", "16"],
        baseline=baseline,
        variant=[variant(v) for v in variants],
        same_rate=same_rate,
        front=[fronted(f) for f in fronts],
        generator=list(generators) or None,
    )


def test_each_variant_follows_its_server_with_its_flags_added() -> None:
    found = servers(args(variants=["d2=--batch-max-delay-ms 2", "d1=--batch-max-delay-ms 1"]), 5)
    names = [s.name for s in found]
    assert names[2:5] == ["recsys-uncached", "recsys-uncached-d2", "recsys-uncached-d1"]
    assert names[5:8] == ["recsys-mix", "recsys-mix-d2", "recsys-mix-d1"]
    by_name = {s.name: s for s in found}
    base = by_name["recsys-uncached"].command
    assert by_name["recsys-uncached-d2"].command == [*base, "--batch-max-delay-ms", "2"]
    assert "--cache-entries" in by_name["recsys-uncached-d1"].command  # still uncached
    assert by_name["recsys-hit-d1"].requests == "hit"


def test_a_second_generator_runs_each_server_again_right_after_it() -> None:
    found = servers(args(variants=["w2=--workers 2"], generators=("native", "python")), 5)
    names = [s.name for s in found]
    assert names[:2] == ["echo", "echo-python"]
    assert names[names.index("recsys-mix") :][:4] == [
        "recsys-mix",
        "recsys-mix-python",
        "recsys-mix-w2",
        "recsys-mix-w2-python",
    ]
    by_name = {s.name: s for s in found}
    assert by_name["recsys-mix-w2-python"].command == by_name["recsys-mix-w2"].command
    assert by_name["recsys-mix-w2-python"].generator == "python"
    assert by_name["recsys-mix-w2"].generator == "native"
    assert {s.generator for s in servers(args(variants=[]), 5)} == {"native"}  # the default
    assert {s.generator for s in servers(args(variants=[], generators=("python",)), 5)} == {
        "python"
    }


def test_the_hit_and_the_mix_keep_no_more_calls_in_flight_than_their_workers_let_wait() -> None:
    found = servers(args(variants=["w2=--workers 2", "w3=--workers 2 --workers 3"]), 5)
    calls = {s.name: s.concurrency for s in found}
    assert ServeSettings().max_pending_rpcs == LOOP_CALLS < 64
    assert calls["recsys-hit"] == calls["recsys-mix"] == LOOP_CALLS
    assert calls["recsys-hit-w2"] == calls["recsys-mix-w2"] == 2 * LOOP_CALLS
    assert calls["recsys-mix-w3"] == 64  # 3 x 32 is more than --concurrency
    assert calls["recsys-uncached"] is None  # misses wait in the servicer: --concurrency
    assert calls["echo"] is None
    fewer = {s.name: s.concurrency for s in servers(args(variants=[], concurrency=8), 5)}
    assert fewer["recsys-hit"] == fewer["recsys-mix"] == 8


def test_a_flag_s_value_is_its_last_as_argparse_reads_it() -> None:
    command = ["recsys", "serve", "--port", "5", "--workers", "2", "--workers", "3"]
    assert flag_value(command, "--workers") == "3"
    assert flag_value(command, "--port") == "5"
    assert flag_value(command, "--metrics-port") is None
    assert metric_samples(command) == []  # no metrics page to read


def test_behind_a_front_the_closed_loop_keeps_the_front_s_calls() -> None:
    found = servers(args(variants=[], fronts=("6/1@12", "32/4")), 5)
    calls = {s.name: s.concurrency for s in found}
    assert calls["recsys-mix-front-6-1"] == calls["recsys-hit-front-6-1"] == 12
    assert calls["recsys-mix-front-32-4"] is None  # --concurrency
    assert calls["recsys-mix"] == LOOP_CALLS


def test_variants_of_a_baseline_run_the_baseline_code() -> None:
    found = servers(args(variants=["d2=--batch-max-delay-ms 2"], baseline=Path("/tmp/old")), 5)
    by_name = {s.name: s for s in found}
    assert by_name["recsys-mix-baseline-d2"].code == Path("/tmp/old")
    assert by_name["recsys-mix-d2"].code is None


@pytest.mark.parametrize("text", ["d2", "=--x", "two words=--x"])
def test_a_variant_without_a_name_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=FLAGS"):
        variant(text)


def test_stage_means_are_per_run_between_two_scrapes() -> None:
    before = {
        "retrieve": (2.0, 100.0),
        "assign": (0.5, 400.0),
        "batch": (400.0, 100.0),
        "batch_run": (3.0, 100.0),
        "queue_delay": (1.0, 400.0),
    }
    after = {
        "retrieve": (2.6, 120.0),  # 20 batches took 0.6 s: 30 ms each
        "assign": (0.58, 480.0),  # 80 requests took 0.08 s: 1 ms each
        "batch": (720.0, 120.0),  # 320 items in 20 batches
        "batch_run": (3.8, 120.0),  # 20 batches ran 0.8 s in all, in 2 s: busy 0.4
        "queue_delay": (1.32, 720.0),  # 320 items waited 0.32 s in all: 1 ms each
        "servicer": (0.64, 320.0),  # first seen after the first scrape: 2 ms a call
        "monitor": (0.01, 5.0),  # first seen after the first scrape
        "capture": (0.0, 0.0),  # never ran: left out
        "gc_pause": (0.012, 3.0),  # first seen after the first scrape: 3 passes, 12 ms in all
        "gc_pause_g0": (0.002, 2.0),  # two of them young passes of 1 ms
    }
    means = stage_means(before, after, wall=2.0)
    assert means == pytest.approx(
        {
            "retrieve_ms": 30.0,
            "assign_ms": 1.0,
            "mean_batch_size": 16.0,
            "batch_run_ms": 40.0,
            "batch_busy": 0.4,
            "queue_delay_ms": 1.0,
            "servicer_ms": 2.0,
            "monitor_ms": 2.0,
            "gc_pause_ms": 4.0,
            "gc_passes": 3,
            "gc_share": 0.006,
            "gc_pause_g0_ms": 1.0,
            "gc_pause_g0_passes": 2,
        }
    )


def test_stage_totals_read_the_stage_and_batcher_histograms() -> None:
    samples = [
        ("recsys_stage_duration_seconds_sum", {"stage": "rank"}, 1.5),
        ("recsys_stage_duration_seconds_count", {"stage": "rank"}, 10.0),
        ("recsys_stage_duration_seconds_bucket", {"stage": "rank", "le": "0.1"}, 10.0),
        ("recsys_batch_size_sum", {}, 80.0),
        ("recsys_batch_size_count", {}, 10.0),
        ("recsys_batch_run_seconds_sum", {}, 2.0),
        ("recsys_batch_run_seconds_count", {}, 10.0),
        ("recsys_batch_queue_delay_seconds_sum", {}, 0.4),
        ("recsys_batch_queue_delay_seconds_count", {}, 80.0),
        ("recsys_request_duration_seconds_sum", {}, 1.0),
        ("recsys_request_duration_seconds_count", {}, 80.0),
        ("recsys_requests_total", {"code": "OK"}, 78.0),
    ]
    assert stage_totals(samples) == {
        "rank": (1.5, 10.0),
        "batch": (80.0, 10.0),
        "batch_run": (2.0, 10.0),
        "queue_delay": (0.4, 80.0),
        "servicer": (1.0, 80.0),
    }


def test_quantile_between_interpolates_within_the_bucket_of_the_calls_between_two_scrapes() -> None:
    before = {0.01: 50.0, 0.02: 90.0, 0.05: 100.0, math.inf: 100.0}
    # 100 calls between the scrapes: 60 up to 10 ms, 30 more up to 20 ms, 10 up to 50 ms.
    after = {0.01: 110.0, 0.02: 180.0, 0.05: 200.0, math.inf: 200.0}
    assert quantile_between(before, after, 0.5) == pytest.approx(0.01 * 50 / 60)
    assert quantile_between(before, after, 0.9) == pytest.approx(0.02)
    assert quantile_between(before, after, 0.99) == pytest.approx(0.02 + 0.03 * 0.9)
    assert quantile_between(after, after, 0.99) is None  # nothing observed between them
    # Beyond the last finite bound: that bound, as histogram_quantile gives.
    assert quantile_between({}, {0.01: 1.0, math.inf: 10.0}, 0.99) == pytest.approx(0.01)


def test_stage_totals_and_cache_lookups_read_a_real_servers_metrics_page() -> None:
    """The same, from the HTTP endpoint a server serves, not from samples written here."""
    metrics = ServingMetrics()
    metrics.observe_batch(BatchStats("recommend", 4, (0.001, 0.002, 0.003, 0.004), 0.02))
    metrics.observe_batch(BatchStats("recommend", 2, (0.005, 0.005), 0.01))
    for seconds in (0.01, 0.03):
        metrics.request_started()
        metrics.request_finished("OK", seconds)
    for hit in (True, True, False):
        metrics.observe_cache(hit, entries=1)
    for generation, seconds, collected in ((0, 0.0004, 700), (0, 0.0006, 0), (2, 0.03, 50)):
        metrics.observe_gc_pause(generation, seconds, collected)
    port = metrics.start_http("127.0.0.1", 0)
    try:
        command = ["recsys", "serve", "--metrics-port", str(port)]
        samples = metric_samples(command)
    finally:
        metrics.stop_http()
    totals, lookups = stage_totals(samples), cache_lookups(samples)
    tails = tail_ms({}, bucket_totals(samples))
    # Calls of 10 and 30 ms: the 99th percentile lies in the (20, 30] ms bucket.
    assert 20.0 < tails["servicer_p99_ms"] <= 30.0
    assert 2.0 < tails["queue_delay_p99_ms"] <= 5.0  # waits of 1-5 ms
    assert 10.0 < tails["batch_run_p99_ms"] <= 20.0  # batches of 10 and 20 ms
    assert 20.0 < tails["gc_pause_p99_ms"] <= 50.0  # passes of 0.4, 0.6 and 30 ms, all labels
    assert totals["batch"] == pytest.approx((6.0, 2.0))
    assert totals["batch_run"] == pytest.approx((0.03, 2.0))
    assert totals["queue_delay"] == pytest.approx((0.02, 6.0))
    assert totals["servicer"] == pytest.approx((0.04, 2.0))
    assert totals["gc_pause"] == pytest.approx((0.031, 3.0))  # both generations
    assert totals["gc_pause_g0"] == pytest.approx((0.001, 2.0))
    assert totals["gc_pause_g2"] == pytest.approx((0.03, 1.0))
    assert gc_collected(samples) == 750.0  # every generation's
    assert gc_collected([]) is None  # a page that does not count them (echo, an older server)
    assert "gc_collected_per_call" not in phase_stages([], [], wall=1.0, calls=250)
    assert phase_stages([], samples, wall=1.0, calls=250)["gc_collected_per_call"] == 3.0
    assert lookups == (2.0, 1.0)


SPINNER = """
import asyncio, subprocess, sys, time
from recsys.serving.batching import MicroBatcher

def spin(items):  # 0.3 s of this thread's CPU in one batch
    end = time.thread_time() + 0.3
    while time.thread_time() < end:
        pass
    return items

async def main():
    child = None
    if sys.argv[1] == "parent":  # a worker process, as `recsys serve --workers N` starts them
        child = subprocess.Popen([sys.executable, "-c", sys.argv[2], "child", ""])
    async with MicroBatcher(spin, name="spin") as batcher:
        await batcher.submit(1)
        print("spun", flush=True)
        await asyncio.sleep(60)

asyncio.run(main())
"""


def test_thread_cpu_sums_each_named_thread_over_a_process_and_its_workers() -> None:
    """Real batch threads (MicroBatcher) in a process and in its child: each names itself,
    and the benchmark reads their CPU from /proc by that name."""
    process = subprocess.Popen(
        [sys.executable, "-c", SPINNER, "parent", SPINNER], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    try:
        assert [process.stdout.readline().strip() for _ in range(2)] == ["spun", "spun"]
        used = thread_cpu([process.pid])
    finally:
        for pid in bench_throughput.family(process.pid)[1:]:
            os.kill(pid, signal.SIGKILL)
        process.kill()
        process.wait()
        process.stdout.close()
    assert 0.55 <= used["batch-spin_0"] < 2.0  # 0.3 s in each of the two processes
    assert used["main"] > 0  # each process's first thread, under one name
    per_call = threads_per_call({"main": 0.5}, {"main": 0.7, "batch-spin": 0.6, "idle": 0.0}, 1000)
    assert per_call == {"batch-spin": 600.0, "main": 200.0}  # largest first, idle left out


def test_steal_is_read_from_the_all_cpu_line_of_proc_stat(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 10 0 20 20 0 0\ncpu0 50 0 25 400 5 0 10 10 0 0\n")
    assert bench_throughput.machine_ticks(stat) == (1000, 20)
    assert bench_throughput.steal_share((1000, 20), (2000, 70)) == 0.05
    assert bench_throughput.steal_share((1000, 20), (1000, 20)) is None
    total, steal = bench_throughput.machine_ticks()  # this machine's own
    assert 0 <= steal <= total
    stat.write_text("intr 5\n")
    with pytest.raises(ValueError, match="expected the all-CPU line first"):
        bench_throughput.machine_ticks(stat)


def test_with_same_rate_each_comparison_runs_at_the_rate_of_what_it_is_compared_with() -> None:
    found = servers(args(variants=["d2=--x"], baseline=Path("/tmp/old"), same_rate=True), 5)
    rate_of = {s.name: s.rate_of for s in found}
    assert rate_of["recsys-mix"] is None
    assert rate_of["recsys-mix-baseline"] == "recsys-mix"
    assert rate_of["recsys-mix-d2"] == "recsys-mix"
    assert rate_of["recsys-mix-baseline-d2"] == "recsys-mix"
    assert found[-1].name == ECHO_AT_HIT
    assert found[-1].rate_of == "recsys-hit"
    assert "echo_server" in " ".join(found[-1].command)
    plain = servers(args(variants=["d2=--x"], baseline=Path("/tmp/old")), 5)
    assert all(s.rate_of is None for s in plain)
    assert ECHO_AT_HIT not in {s.name for s in plain}


def test_odd_rounds_run_each_comparison_before_what_it_is_compared_with() -> None:
    listed = servers(args(variants=["d2=--x"], baseline=Path("/tmp/old"), same_rate=True), 5)
    assert in_turn(listed, 0) == listed
    odd = [s.name for s in in_turn(listed, 1)]
    assert odd[:2] == ["echo", "naive"]
    assert odd[2:6] == [
        "recsys-uncached-baseline-d2",
        "recsys-uncached-baseline",
        "recsys-uncached-d2",
        "recsys-uncached",
    ]
    assert odd[-5:] == [
        "recsys-hit-baseline-d2",
        "recsys-hit-baseline",
        "recsys-hit-d2",
        "recsys-hit",
        ECHO_AT_HIT,  # after the hit, whose rate it runs at
    ]
    assert sorted(odd) == sorted(s.name for s in listed)


def test_a_server_whose_comparisons_ran_first_takes_the_rate_they_ran_at() -> None:
    listed = servers(args(variants=[], baseline=Path("/tmp/old"), same_rate=True), 5)
    by_name = {s.name: s for s in listed}
    leader, old = by_name["recsys-mix"], by_name["recsys-mix-baseline"]
    hit, echo = by_name["recsys-hit"], by_name[ECHO_AT_HIT]
    runs: dict[str, list[dict[str, object]]] = {}
    assert open_loop_rate(leader, runs, []) is None  # round 0: 70% of its own saturation
    runs["recsys-mix"] = [{"at_70pct": {"rate": 900.0}}]
    runs["recsys-hit"] = [{"at_70pct": {"rate": 3000.0}}]
    assert open_loop_rate(old, runs, [leader]) == 900.0
    runs["recsys-mix-baseline"] = [{"at_70pct": {"rate": 900.0}}]
    # Round 1: the baseline runs first, at the leader's last rate, then the leader at the same.
    assert open_loop_rate(old, runs, []) == 900.0
    assert open_loop_rate(leader, runs, [old]) == 900.0
    # Nothing compared with it ran before it: its own saturation, as in round 0 (the hit's
    # comparison, echo at its rate, runs after it in every round).
    assert open_loop_rate(leader, runs, [hit, echo]) is None
    assert open_loop_rate(hit, runs, [leader, old]) is None
    assert open_loop_rate(echo, runs, [hit]) == 3000.0


def test_a_fixed_open_loop_rate_is_every_server_s_whatever_ran_before() -> None:
    listed = servers(args(variants=[], baseline=Path("/tmp/old"), same_rate=True), 5)
    by_name = {s.name: s for s in listed}
    leader, old = by_name["recsys-mix"], by_name["recsys-mix-baseline"]
    runs: dict[str, list[dict[str, object]]] = {"recsys-mix": [{"at_70pct": {"rate": 900.0}}]}
    assert open_loop_rate(old, runs, [leader]) == 900.0
    assert open_loop_rate(old, runs, [leader], 1500.0) == 1500.0
    assert open_loop_rate(leader, {}, [], 1500.0) == 1500.0


@pytest.mark.parametrize("text", ["0", "-3", "x", "inf", "nan"])
def test_an_open_loop_rate_that_is_not_a_positive_number_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected a positive number"):
        calls_per_second(text)
    assert calls_per_second("2200") == 2200.0


def test_same_rate_ratios_compare_open_loop_cpu_medians() -> None:
    def run(cpu: float, rate_of: str | None = None) -> dict[str, object]:
        return {"at_70pct": {"server_cpu_us_per_request": cpu}, "rate_of": rate_of}

    runs = {
        "recsys-hit": [run(300.0), run(280.0)],
        "recsys-hit-baseline": [run(360.0, "recsys-hit"), run(320.0, "recsys-hit")],
        ECHO_AT_HIT: [run(200.0, "recsys-hit"), run(180.0, "recsys-hit")],
    }
    assert same_rate_ratios(runs) == {
        "recsys-hit-baseline_vs_recsys-hit_cpu_per_call_same_rate": pytest.approx(
            340 / 290, abs=1e-3
        ),
        "recsys-hit_vs_echo_cpu_per_call_same_rate": pytest.approx(290 / 190, abs=1e-3),
    }


def test_refusals_by_gRPC_core_count_as_shed() -> None:
    assert shed_share({"OK": 50, "RESOURCE_EXHAUSTED": 10, "CANCELLED": 40}) == 0.5
    assert shed_share({"OK": 10}) == 0.0
    assert shed_share({}) == 0.0


def test_the_phases_of_a_run_continue_along_one_request_stream() -> None:
    stream = RequestStream([recommender_pb2.RecommendRequest(request_id=str(i)) for i in range(3)])
    first = [stream.next().request_id for _ in range(2)]  # a warm-up
    second = [stream.next().request_id for _ in range(1)]  # the next phase goes on from there
    assert (first, second, stream.wrapped) == (["0", "1"], ["2"], False)
    assert stream.next().request_id == "0"
    assert stream.wrapped  # the list ran out: this call repeats one already sent


def test_the_hit_rate_is_the_phase_s_own() -> None:
    assert hit_rate((600.0, 400.0), (1300.0, 700.0)) == 0.7  # 700 hits, 300 misses
    assert hit_rate((5.0, 5.0), (5.0, 5.0)) is None


class PeerRecorder(recommender_pb2_grpc.RecommenderServicer):
    """Answers every call and remembers the connection (the client's address and port) it
    came on, and each call's request id."""

    def __init__(self) -> None:
        self.peers: set[str] = set()
        self.request_ids: list[str] = []

    async def Recommend(
        self, request: recommender_pb2.RecommendRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> recommender_pb2.RecommendResponse:
        self.peers.add(context.peer())
        self.request_ids.append(request.request_id)
        return recommender_pb2.RecommendResponse(request_id=request.request_id)


def native_generator_buildable() -> bool:
    if shutil.which("g++") is None or shutil.which("pkg-config") is None:
        return False
    return subprocess.run(["pkg-config", "--exists", "grpc++"]).returncode == 0


@pytest.mark.parametrize("generator", ["native", "python"])
async def test_each_generator_sends_the_phases_along_the_stream(
    generator: str, tmp_path: Path
) -> None:
    """A closed-loop phase, then an open-loop one that goes on from where it stopped, over a
    connection per channel, from either generator (a real server on a real port)."""
    if generator == "native" and not native_generator_buildable():
        pytest.skip("g++, pkg-config and libgrpc++-dev are needed to build the native generator")
    recorder = PeerRecorder()
    server = grpc.aio.server()
    recommender_pb2_grpc.add_RecommenderServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    # longer than a closed loop of 0.3 s sends: the open loop's first call is not the list's
    ids = range(50_000)
    stream = RequestStream([recommender_pb2.RecommendRequest(request_id=str(i)) for i in ids])
    request_file = tmp_path / "requests.bin"
    write_requests(request_file, stream.requests)
    target = f"127.0.0.1:{port}"
    try:
        closed = await asyncio.to_thread(
            run_phase, generator, target, stream, 0.3, calls=CHANNELS * 2,
            request_file=request_file,
        )  # fmt: skip
        sent, closed_peers = len(recorder.request_ids), set(recorder.peers)
        first = stream.position
        opened = await asyncio.to_thread(
            run_phase, generator, target, stream, 0.5, rate=20, request_file=request_file
        )
    finally:
        await server.stop(None)
    assert closed.codes == {"OK": sent}
    assert len(closed.latencies) == sent > CHANNELS * 2
    assert first == sent  # the stream moved on by the calls the closed loop sent
    assert opened.codes == {"OK": 10}
    assert len(opened.latencies) == len(opened.send_lag) == 10
    assert 0 < first < len(ids) - 10
    expected = sorted(str(first + n) for n in range(10))
    assert sorted(recorder.request_ids[sent:]) == expected
    assert stream.position == first + 10
    assert len(closed_peers) == CHANNELS  # a connection per channel
    assert len(recorder.peers - closed_peers) == 10  # call n on channel n: 10 calls, 10 channels


async def test_the_load_comes_over_one_connection_per_channel() -> None:
    """``recsys serve --workers N`` hands each connection to one worker: the benchmark's
    channels must not share one connection, or every call reaches the same worker."""
    recorder = PeerRecorder()
    server = grpc.aio.server()
    recommender_pb2_grpc.add_RecommenderServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        stream = RequestStream([recommender_pb2.RecommendRequest(request_id="r")])
        latencies, codes = await closed_loop(f"127.0.0.1:{port}", stream, CHANNELS * 2, 0.5)
    finally:
        await server.stop(None)
    assert codes.get("OK", 0) == len(latencies) > 0
    assert len(recorder.peers) == CHANNELS


def test_a_pinned_server_runs_on_the_cpus_listed() -> None:
    """``--server-cpus`` starts each server under ``taskset``: the process sees only those
    CPUs (a real process, not the command line)."""
    show = [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]
    out = subprocess.run(pinned("0", show), check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[0]"
    assert pinned(None, show) == show


def test_client_cpus_without_server_cpus_is_refused() -> None:
    """Pinning the client alone would pin the servers it starts with it."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_throughput", "--client-cpus", "0"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "--client-cpus needs --server-cpus" in out.stderr


def test_a_generator_named_twice_is_refused() -> None:
    command = [sys.executable, "-m", "benchmarks.bench_throughput"]
    out = subprocess.run(
        [*command, "--generator", "python", "--generator", "python"], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "--generator python python: expected each generator once" in out.stderr


def test_with_front_each_server_and_variant_is_followed_by_itself_behind_the_front() -> None:
    listed = {
        s.name: s
        for s in servers(args(variants=["w2=--workers 2"], same_rate=True, fronts=("32/4",)), 50051)
    }
    names = [n for n in listed if n.startswith("recsys-uncached")]
    assert names == [
        "recsys-uncached",
        "recsys-uncached-front",
        "recsys-uncached-w2",
        "recsys-uncached-w2-front",
    ]
    fronted = listed["recsys-uncached-w2-front"]
    assert fronted.command[-4:] == ["--workers", "2", "--worker-port-stride", "1"]
    assert fronted.front is not None
    assert (fronted.front.max_in_flight, fronted.front.max_queue_ms) == (32, 4)
    assert fronted.rate_of == "recsys-uncached"  # compared at the rate of the plain server
    assert listed["recsys-uncached-w2"].front is None
    assert fronted.concurrency is None  # --concurrency


def test_several_fronts_each_follow_the_server_named_by_their_bounds() -> None:
    fronts = ("32/4", "6/1@12")
    listed = {s.name: s for s in servers(args(variants=[], fronts=fronts), 50051)}
    names = [n for n in listed if n.startswith("recsys-mix")]
    assert names == ["recsys-mix", "recsys-mix-front-32-4", "recsys-mix-front-6-1"]
    tight = listed["recsys-mix-front-6-1"]
    assert tight.front is not None
    assert (tight.front.max_in_flight, tight.front.max_queue_ms) == (6, 1)
    assert tight.concurrency == 12
    assert listed["recsys-mix-front-32-4"].concurrency is None


@pytest.mark.parametrize("text", ["6/1@", "6/1@0", "6/1@x", "6@12"])
def test_a_front_with_a_bad_call_count_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="--front"):
        fronted(text)


@pytest.mark.parametrize("text", ["32", "x/4", "0/4", "32/0", "3/2/-1", "3/2/x"])
def test_a_front_without_two_positive_bounds_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected IN_FLIGHT/QUEUE_MS"):
        front_bounds(text)


def test_front_bounds_read_the_optional_queued_bound() -> None:
    bounds = front_bounds("3/2/3")
    assert (bounds.max_in_flight, bounds.max_queue_ms, bounds.max_queued) == (3, 2, 3)
    assert front_bounds("32/4").max_queued == 0


@pytest.mark.parametrize("text", ["0", "1.5", "x", "-0.2"])
def test_an_open_loop_share_outside_0_to_1_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected a number in"):
        open_loop_share(text)
    assert open_loop_share("0.9") == 0.9


def test_front_bounds_read_the_optional_balance_into_the_servers_name() -> None:
    assert front_bounds("32/4").balance == "user"
    assert front_bounds("32/4:leastconn").balance == "leastconn"
    assert front_bounds("3/2/3:user").max_queued == 3
    assert fronted("32/4:leastconn@64").name == "32-4-leastconn"
    with pytest.raises(argparse.ArgumentTypeError, match="balance 'hash': expected one of"):
        front_bounds("32/4:hash")
