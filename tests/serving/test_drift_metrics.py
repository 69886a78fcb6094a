"""The monitor stage on a real server: served traffic reaches /metrics as drift series per
model version and arm, the Python API sees the same windows, and the summary log is written."""

from __future__ import annotations

from pathlib import Path

import grpc

from recsys.monitoring.summaries import iter_summaries
from recsys.monitoring.windows import ALL_ARMS
from recsys.serving.metrics import ServingMetrics
from recsys.serving.pipeline import Pipeline, open_pipeline
from recsys.serving.server import RunningServer
from recsys.settings import ServeSettings
from recsys.v1 import recommender_pb2, recommender_pb2_grpc
from tests.serving.metrics_page import fetch_metrics


async def test_served_traffic_shows_up_as_drift_series_in_metrics(
    artifacts: Path, tmp_path: Path
) -> None:
    settings = ServeSettings(
        artifacts=artifacts,
        port=0,
        metrics_port=0,
        drain_seconds=2,
        exposure_dir=tmp_path / "exposures",
        cache_entries=0,
        max_queue_delay_ms=10_000,
    )
    opened: list[Pipeline] = []

    async def open_and_keep(settings: ServeSettings, metrics: ServingMetrics) -> Pipeline:
        opened.append(await open_pipeline(settings, metrics))
        return opened[-1]

    server = await RunningServer.start(settings, open_and_keep)
    try:
        await server.wait_ready()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = recommender_pb2_grpc.RecommenderStub(channel)
            for n in range(40):
                await stub.Recommend(
                    recommender_pb2.RecommendRequest(user_id=f"user-{n:07d}", num_results=10)
                )
        page = fetch_metrics(server.metrics_port)
        monitor = opened[0].monitor
        assert monitor is not None
        windows = monitor.stats()
    finally:
        await server.stop()

    lines = page.splitlines()
    assert any(
        line.startswith('recsys_stage_duration_seconds_count{stage="monitor"}') for line in lines
    )
    psi = [line for line in lines if line.startswith("recsys_drift_psi{")]
    assert any('feature="score"' in line and 'reference="training"' in line for line in psi)
    assert any('feature="item_price"' in line for line in psi)
    assert any(line.startswith("recsys_model_role{") and "production" in line for line in lines)
    assert not any("user-" in line or "sku" in line for line in psi)  # no user or item labels
    rows = {
        line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith("recsys_drift_window_requests{")
    }
    every = [value for labels, value in rows.items() if f'arm="{ALL_ARMS}"' in labels]
    assert every == [40.0]  # every request, once, in its version's all-arms window
    by_arm = {(w.model_version, w.arm): w for w in windows}
    assert sum(w.requests for (_, arm), w in by_arm.items() if arm != ALL_ARMS) == 40
    assert all(w.rows == 10 * w.requests for w in windows)  # 10 served items per request
    summaries = list(iter_summaries(settings.monitor_path, kind="drift"))
    assert {(s["model_version"], s["arm"]) for s in summaries} == set(by_arm)
