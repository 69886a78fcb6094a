"""The admission front (recsys/serving/front.py): a real HAProxy in front of a real gRPC server.

CI installs haproxy (.ci/run); elsewhere the tests that run it are skipped."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.bench_latency import wait_serving_for
from recsys.cli.main import main
from recsys.serving.front import (
    SHED_MESSAGE,
    Backend,
    FrontError,
    FrontSettings,
    haproxy_config,
    parse_backend,
    start_front,
)
from recsys.serving.routing import user_metadata
from recsys.serving.server import RunningServer
from recsys.serving.workers import free_port
from recsys.settings import ServeSettings
from recsys.v1 import recommender_pb2, recommender_pb2_grpc
from tests.serving.test_admission import GatedPipeline, gated_server

needs_haproxy = pytest.mark.skipif(
    shutil.which("haproxy") is None,
    reason="haproxy not installed (apt-get install haproxy; CI has it)",
)


def settings(**changes: object) -> FrontSettings:
    base: dict[str, object] = {
        "listen_host": "127.0.0.1",
        "listen_port": 50051,
        "backends": (Backend("127.0.0.1", 50052),),
        "max_in_flight": 4,
        "max_queue_ms": 5,
    }
    return FrontSettings(**{**base, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"listen_host": "a b"}, "listen host 'a b': expected a host name or IP address"),
        ({"backends": (Backend("x;y", 1),)}, "backend host 'x;y'"),
        ({"listen_port": 0}, "listen port 0: expected 1-65535"),
        ({"backends": (Backend("127.0.0.1", 70000),)}, "backend port 70000: expected 1-65535"),
        ({"backends": ()}, "backends: expected at least one HOST:PORT"),
        ({"max_in_flight": 0}, "max_in_flight 0: expected >= 1"),
        ({"max_queue_ms": 0}, "max_queue_ms 0: expected >= 1"),
        ({"metrics": Backend("a\nb", 9101)}, "metrics host 'a"),
        # a newline at the end, too: it would end a line of HAProxy's configuration
        ({"metrics": Backend("127.0.0.1\n", 9101)}, "metrics host '127.0.0.1"),
        ({"backends": (Backend("127.0.0.1\n", 1),)}, "backend host '127.0.0.1"),
        ({"metrics": Backend("127.0.0.1", 0)}, "metrics port 0: expected 1-65535"),
        ({"balance": "roundrobin"}, "balance 'roundrobin': expected one of user, leastconn"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(
    changes: dict[str, object], message: str
) -> None:
    with pytest.raises(FrontError, match=message.replace("(", r"\(").replace(")", r"\)")):
        settings(**changes)


@pytest.mark.parametrize(
    ("text", "backend"),
    [("127.0.0.1:50052", Backend("127.0.0.1", 50052)), ("[::1]:7", Backend("::1", 7))],
)
def test_backends_parse_host_and_port(text: str, backend: Backend) -> None:
    assert parse_backend(text) == backend


@pytest.mark.parametrize("text", ["50052", "host:", ":1", "host:port"])
def test_a_backend_without_host_and_port_is_refused(text: str) -> None:
    with pytest.raises(FrontError, match="expected HOST:PORT"):
        parse_backend(text)


def test_the_configuration_bounds_each_backend_and_the_queue_wait() -> None:
    text = haproxy_config(
        settings(backends=(Backend("127.0.0.1", 7001), Backend("::1", 7002)), max_queue_ms=12)
    )
    assert "    server w0 127.0.0.1:7001 proto h2 maxconn 4\n" in text
    assert "    server w1 [::1]:7002 proto h2 maxconn 4\n" in text
    assert "    timeout queue 12ms\n" in text
    assert "    bind 127.0.0.1:50051 proto h2\n" in text
    assert "hdr grpc-status 8" in text
    assert "prometheus-exporter" not in text  # no metrics unless asked for


def test_the_metrics_address_gets_haproxy_s_exporter_and_nothing_else() -> None:
    text = haproxy_config(settings(metrics=Backend("::1", 9101)))
    block = text[text.index("frontend metrics") :]
    assert "    bind [::1]:9101\n" in block
    assert "    http-request use-service prometheus-exporter if { path /metrics }\n" in block
    assert "    http-request return status 404\n" in block  # any other path


@contextmanager
def front(
    tmp_path: Path, backend_port: int, in_flight: int, queue_ms: int, metrics: int | None = None
) -> Iterator[str]:
    config = settings(
        listen_port=free_port("127.0.0.1"),
        backends=(Backend("127.0.0.1", backend_port),),
        max_in_flight=in_flight,
        max_queue_ms=queue_ms,
        metrics=None if metrics is None else Backend("127.0.0.1", metrics),
    )
    process = start_front(config, tmp_path)
    try:
        yield f"127.0.0.1:{config.listen_port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


@asynccontextmanager
async def gated(tmp_path: Path) -> AsyncIterator[tuple[RunningServer, GatedPipeline]]:
    server_settings = ServeSettings(artifacts=tmp_path, port=0, metrics_port=0)
    async with gated_server(server_settings) as running:
        yield running


async def hold_the_slot(
    stub: recommender_pb2_grpc.RecommenderAsyncStub,
    request: recommender_pb2.RecommendRequest,
    pipeline: GatedPipeline,
) -> asyncio.Future[recommender_pb2.RecommendResponse]:
    """Send ``request`` and wait until the gated server holds it (the front's one slot)."""
    held = asyncio.ensure_future(stub.Recommend(request))
    for _ in range(1000):
        if pipeline.deadlines:
            break
        await asyncio.sleep(0.01)
    return held


@needs_haproxy
async def test_a_call_that_waits_past_the_bound_is_refused_without_reaching_the_server(
    tmp_path: Path,
) -> None:
    async with gated(tmp_path) as (server, pipeline):
        with front(tmp_path, server.port, in_flight=1, queue_ms=300) as target:
            await wait_serving_for(target, 10)
            async with grpc.aio.insecure_channel(target) as channel:
                stub = recommender_pb2_grpc.RecommenderStub(channel)
                request = recommender_pb2.RecommendRequest(user_id="u")
                held = await hold_the_slot(stub, request, pipeline)
                start = time.perf_counter()
                with pytest.raises(grpc.aio.AioRpcError) as shed:
                    await stub.Recommend(request, timeout=10)
                waited = time.perf_counter() - start
                assert shed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert shed.value.details() == SHED_MESSAGE
                assert 0.3 <= waited < 5.0  # refused by time, after the bound
                assert len(pipeline.deadlines) == 1  # the server never saw the refused call
                pipeline.release.set()
                reply = await held  # the held call is answered, not refused
                assert len(reply.items) == 0


def haproxy_series_queried() -> set[str]:
    """The haproxy_ series the alert rules and the dashboard (ops/) query."""
    ops = Path(__file__).resolve().parents[2] / "ops"
    paths = (ops / "prometheus" / "recsys-alerts.yml", ops / "grafana" / "recsys-dashboard.json")
    return {name for path in paths for name in re.findall(r"haproxy_[a-z_]+", path.read_text())}


def metrics_samples(metrics_port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A metrics page (the front's or the servers'), parsed as Prometheus text: value by name
    and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as page:
        text = page.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@needs_haproxy
async def test_the_front_s_metrics_count_its_refusals_which_the_server_never_sees(
    tmp_path: Path,
) -> None:
    metrics_port = free_port("127.0.0.1")
    async with gated(tmp_path) as (server, pipeline):
        with front(
            tmp_path, server.port, in_flight=1, queue_ms=200, metrics=metrics_port
        ) as target:
            await wait_serving_for(target, 10)
            before = await asyncio.to_thread(metrics_samples, metrics_port)
            async with grpc.aio.insecure_channel(target) as channel:
                stub = recommender_pb2_grpc.RecommenderStub(channel)
                request = recommender_pb2.RecommendRequest(user_id="u")
                held = await hold_the_slot(stub, request, pipeline)
                busy = await asyncio.to_thread(metrics_samples, metrics_port)
                for _ in range(3):
                    with pytest.raises(grpc.aio.AioRpcError) as shed:
                        await stub.Recommend(request, timeout=10)
                    assert shed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                pipeline.release.set()
                await held
            after = await asyncio.to_thread(metrics_samples, metrics_port)
            with pytest.raises(urllib.error.HTTPError) as other:
                await asyncio.to_thread(
                    urllib.request.urlopen, f"http://127.0.0.1:{metrics_port}/", timeout=5
                )
            other.value.close()
            assert other.value.code == 404

    def value(samples: dict[Any, float], name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert value(busy, "haproxy_server_current_sessions", proxy="recsys", server="w0") == 1
    refused = grew("haproxy_frontend_http_responses_total", proxy="grpc", code="5xx")
    assert refused == 3  # the three refusals, and nothing else
    assert grew("haproxy_frontend_http_responses_total", proxy="grpc", code="2xx") == 1
    assert grew("haproxy_frontend_http_requests_total", proxy="grpc") == 4
    assert len(pipeline.deadlines) == 1  # the server saw only the held call
    # The alert rules and the dashboard query series this exporter serves.
    queried = haproxy_series_queried()
    assert queried >= {"haproxy_frontend_http_responses_total", "haproxy_backend_current_queue"}
    assert queried <= {name for name, _labels in after}


@needs_haproxy
async def test_a_burst_the_server_clears_within_the_bound_is_queued_not_refused(
    tmp_path: Path,
) -> None:
    # One call at a time reaches the server, but 40 sent at once all wait less than the bound:
    # the front judges time, not how many calls are waiting.
    async with gated(tmp_path) as (server, pipeline):
        pipeline.release.set()
        with front(tmp_path, server.port, in_flight=1, queue_ms=10_000) as target:
            await wait_serving_for(target, 10)
            async with grpc.aio.insecure_channel(target) as channel:
                stub = recommender_pb2_grpc.RecommenderStub(channel)
                calls = [
                    stub.Recommend(recommender_pb2.RecommendRequest(user_id=f"u{n}"))
                    for n in range(40)
                ]
                replies = await asyncio.gather(*calls)
    assert len(replies) == 40
    assert len(pipeline.deadlines) == 40


@needs_haproxy
def test_a_configuration_haproxy_refuses_is_reported_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(FrontError, match="haproxy refused the configuration") as refused:
        # A port already bound by another process is only found at start; a listen address
        # haproxy cannot parse is found by its check.
        start_front(settings(listen_host="256.0.0.1"), tmp_path)
    assert "\n" not in str(refused.value)


def two_free_ports() -> int:
    """A port P with P + 1 free too (for ``--worker-port-stride 1``)."""
    for _ in range(100):
        port = free_port("127.0.0.1")
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two consecutive free ports")


@needs_haproxy
def test_workers_on_a_port_each_serve_behind_one_front(artifacts_dir: Path, tmp_path: Path) -> None:
    # The pods' layout (deploy/recsys.yaml): `serve --workers 2 --worker-port-stride 1` behind
    # `recsys front` with a backend per worker, each worker bounded on its own.
    port, metrics_port, listen = two_free_ports(), free_port("127.0.0.1"), free_port("127.0.0.1")
    serve = [
        sys.executable, "-m", "recsys.cli.main", "serve", "--artifacts", str(artifacts_dir),
        "--port", str(port), "--metrics-port", str(metrics_port), "--workers", "2",
        "--worker-port-stride", "1", "--exposure-dir", str(tmp_path / "exposures"),
    ]  # fmt: skip
    front_command = [
        sys.executable, "-m", "recsys.cli.main", "front", "--listen", f"127.0.0.1:{listen}",
        "--backend", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{port + 1}",
        "--max-in-flight", "2", "--max-queue-ms", "5000",
    ]  # fmt: skip
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=out)
    front_process = subprocess.Popen(front_command, stdout=subprocess.DEVNULL)
    try:
        for worker_port in (port, port + 1):  # each worker alone on its port
            asyncio.run(wait_serving_for(f"127.0.0.1:{worker_port}", 120))
        target = f"127.0.0.1:{listen}"
        asyncio.run(wait_serving_for(target, 10))
        with grpc.insecure_channel(target) as channel:
            stub = recommender_pb2_grpc.RecommenderStub(channel)
            for _ in range(3):  # a feed and two refreshes a user, the users in turn
                for n in range(11):
                    user = f"user-{n:07d}"
                    request = recommender_pb2.RecommendRequest(user_id=user, hour=12)
                    reply = stub.Recommend(request, timeout=30, metadata=user_metadata(user))
                    assert len(reply.items) == 20
        # Balanced by the user header, each user's refreshes reached the worker that cached
        # the feed: every refresh a hit. (Least connections, here round-robin, would send an
        # odd number of users' calls in turn to the other worker: 11 hits, 22 misses.)
        lookups = {
            dict(labels)["result"]: value
            for (name, labels), value in metrics_samples(metrics_port).items()
            if name == "recsys_result_cache_lookups_total"
        }
        assert lookups == {"hit": 22.0, "miss": 11.0}
        front_process.terminate()
        front_process.wait(timeout=30)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, log.read_text()
        assert f"port {port}, {port + 1}" in log.read_text()
    finally:
        for process in (front_process, server):
            if process.poll() is None:
                process.kill()
                process.wait()


def test_the_command_prints_the_configuration_from_flags_or_variables(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_FRONT_BACKENDS", "127.0.0.1:50061, 127.0.0.1:50062")
    monkeypatch.setenv("RECSYS_FRONT_MAX_QUEUE_MS", "3")
    assert main(["front", "--print-config", "--max-in-flight", "5"]) == 0
    text = capsys.readouterr().out
    expected = settings(
        backends=(Backend("127.0.0.1", 50061), Backend("127.0.0.1", 50062)),
        max_in_flight=5,
        max_queue_ms=3,
        metrics=Backend("127.0.0.1", 9101),  # on loopback by default, as the servers' metrics
    )
    assert text == haproxy_config(expected)
    monkeypatch.setenv("RECSYS_FRONT_METRICS", "0.0.0.0:9200")
    assert main(["front", "--print-config", "--max-in-flight", "5"]) == 0
    assert capsys.readouterr().out == haproxy_config(
        replace(expected, metrics=Backend("0.0.0.0", 9200))
    )
    assert main(["front", "--print-config", "--max-in-flight", "5", "--metrics", ""]) == 0
    assert capsys.readouterr().out == haproxy_config(replace(expected, metrics=None))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "front --backend: expected at least one HOST:PORT"),
        (["--backend", "h:1", "--max-in-flight", "x"], "--max-in-flight 'x': expected a whole"),
        (["--backend", "h:1", "--max-queue-ms", "0"], "max_queue_ms 0: expected >= 1"),
        (["--backend", "h:1", "--listen", "80"], "--listen '80': expected HOST:PORT"),
        (["--backend", "h:1", "--metrics", "9101"], "--metrics '9101': expected HOST:PORT"),
        (
            ["--backend", "h:1", "--balance", "hash"],
            "balance 'hash': expected one of user, leastconn",
        ),
    ],
)
def test_bad_front_flags_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["front", "--print-config", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1


@needs_haproxy
async def test_on_sigterm_the_front_forwards_through_the_grace_then_drains(
    tmp_path: Path,
) -> None:
    async with gated(tmp_path) as (server, pipeline):
        listen = free_port("127.0.0.1")
        command = [
            sys.executable, "-m", "recsys.cli.main", "front", "--listen", f"127.0.0.1:{listen}",
            "--backend", f"127.0.0.1:{server.port}", "--shutdown-grace-seconds", "1.5",
            "--metrics", f"127.0.0.1:{free_port('127.0.0.1')}",
        ]  # fmt: skip
        log = (tmp_path / "front.log").open("wb")
        front_process = await asyncio.create_subprocess_exec(*command, stderr=log)
        try:
            target = f"127.0.0.1:{listen}"
            await wait_serving_for(target, 10)
            async with grpc.aio.insecure_channel(target) as channel:
                stub = recommender_pb2_grpc.RecommenderStub(channel)
                request = recommender_pb2.RecommendRequest(user_id="u")
                front_process.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                pipeline.release.set()
                await stub.Recommend(request)  # within the grace: still forwarded
                pipeline.release.clear()
                held = asyncio.ensure_future(stub.Recommend(request))
                await asyncio.sleep(2.0)  # past the grace: HAProxy drains
                async with grpc.aio.insecure_channel(target) as fresh:
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await recommender_pb2_grpc.RecommenderStub(fresh).Recommend(
                            request, timeout=5
                        )
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # not listening
                assert front_process.returncode is None  # the call in flight holds the drain
                pipeline.release.set()
                await held  # finished, not cut off
            code = await asyncio.wait_for(front_process.wait(), 30)
            assert code == 0, (tmp_path / "front.log").read_text()
        finally:
            if front_process.returncode is None:
                front_process.kill()
                await front_process.wait()
            log.close()
