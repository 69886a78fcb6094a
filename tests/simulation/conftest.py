"""A real server on the small test world, and the world's truth for the simulator."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from recsys.serving.pipeline import open_pipeline
from recsys.serving.server import RunningServer
from recsys.settings import ServeSettings
from recsys.simulation.simulator import SimulatedWorld, SimulateSettings, load_simulated_world
from tests.control.redis_helpers import redis_prefix, redis_url

__all__ = ["redis_prefix", "redis_url"]


@pytest.fixture(scope="session")
def simulated_world(artifacts_dir: Path) -> SimulatedWorld:
    return load_simulated_world(artifacts_dir, "", "recsys:")


def serve_settings(artifacts: Path, exposures: Path, **changes: object) -> ServeSettings:
    # No result cache: a scenario's change must reach every page. A generous feature-store
    # timeout and queue delay: a busy test machine can take longer than 5 ms to answer a local
    # Redis, and must not shed the simulator's calls.
    settings = ServeSettings(
        artifacts=artifacts,
        port=0,
        metrics_port=0,
        drain_seconds=2,
        cache_entries=0,
        exposure_dir=exposures,
        feature_store_timeout_ms=5_000,
        max_queue_delay_ms=20_000,
    )
    return replace(settings, **changes)  # type: ignore[arg-type]


@pytest.fixture
async def server(artifacts: Path, tmp_path: Path) -> AsyncIterator[RunningServer]:
    running = await RunningServer.start(
        serve_settings(artifacts, tmp_path / "exposures"), open_pipeline
    )
    try:
        await running.wait_ready()
        yield running
    finally:
        await running.stop()


def quick(target: str, outcomes: Path, **changes: object) -> SimulateSettings:
    """Ten simulated minutes at the lunch peak in about two wall seconds."""
    settings = SimulateSettings(
        target=target,
        minutes=10.0,
        speed=300.0,
        rate=60.0,
        users=500,
        start_hour=12.0,
        onset_minutes=0.0,
        concurrency=8,
        outcomes=outcomes,
        timeout_seconds=30.0,
    )
    return replace(settings, **changes)  # type: ignore[arg-type]
