"""`recsys models retrain` on traffic a real server logged and the simulator reacted to."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from recsys.build import BuildReport
from recsys.cli.main import main
from recsys.serving.pipeline import open_pipeline
from recsys.serving.server import RunningServer
from recsys.settings import TrackingSettings
from recsys.simulation.simulator import SimulatedWorld, Simulation
from tests.simulation.conftest import quick, serve_settings, simulated_world

__all__ = ["simulated_world"]

LATE_SECONDS = 0.5


async def _log_traffic(artifacts: Path, logs: Path, world: SimulatedWorld) -> int:
    running = await RunningServer.start(
        serve_settings(artifacts, logs / "exposures"), open_pipeline
    )
    try:
        await running.wait_ready()
        settings = quick(f"127.0.0.1:{running.port}", logs / "outcomes", minutes=40.0, users=800)
        report = await Simulation(settings, world).run()
    finally:
        await running.stop()  # flushes the exposure log
    await asyncio.sleep(LATE_SECONDS * 2)  # every request's late window has closed
    return int(report.requests)


async def test_a_retrained_version_carries_its_lineage_into_the_registry_and_mlflow(
    artifacts: Path,
    built_world: tuple[Path, BuildReport],
    simulated_world: SimulatedWorld,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs = tmp_path / "logs"
    requests = await _log_traffic(artifacts, logs, simulated_world)
    assert requests > 200
    code = main(
        [
            "models",
            "retrain",
            "--artifacts",
            str(artifacts),
            "--since",
            "0",
            "--exposures",
            str(logs / "exposures"),
            "--outcomes",
            str(logs / "outcomes"),
            "--late-seconds",
            str(LATE_SECONDS),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    version = out.strip().splitlines()[-1]
    manifest = json.loads((artifacts / "models" / "ranker" / version / "manifest.json").read_text())
    lineage = manifest["lineage"]
    assert lineage["parent_version"] == built_world[1].model_version
    assert len(lineage["exposures"]["sha256"]) == 64
    assert len(lineage["outcomes"]["sha256"]) == 64
    assert 0 < lineage["join"]["requests_used"] <= requests
    assert lineage["join"]["orphans"] == 0
    assert lineage["split"]["heldout_requests"] > 0
    assert lineage["features_version"] == manifest["features_version"]
    assert manifest["code_version"]
    assert manifest["metrics"]["ndcg@20.ranker"] > 0
    assert "held-out users' logged requests" in err  # the gate report on logged data

    uri = TrackingSettings(artifacts=artifacts).store_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("recsys")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id], "tags.`recsys.kind` = 'retrain'")
    assert run.data.tags["recsys.parent_version"] == built_world[1].model_version
    assert run.data.params["lineage.exposures.sha256"] == lineage["exposures"]["sha256"]


def test_an_empty_window_is_one_line(
    artifacts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "e").mkdir()
    (tmp_path / "o").mkdir()
    code = main(
        [
            "models",
            "retrain",
            "--artifacts",
            str(artifacts),
            "--since",
            "2026-01-01T00:00",
            "--exposures",
            str(tmp_path / "e"),
            "--outcomes",
            str(tmp_path / "o"),
            "--no-tracking",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "recsys: no complete joined request with impressions in the window"
    )
