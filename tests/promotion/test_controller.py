"""The canary controller on a real server with simulated users: a canary as good as production
is promoted, a guardrail breach rolls it back, each decision in the registry's history."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest

from recsys.artifacts import ArtifactRoot
from recsys.build import BuildReport
from recsys.cli.main import main
from recsys.control.backends import open_store
from recsys.promotion.controller import CanaryController, LogSources
from recsys.promotion.policy import CanaryPolicy
from recsys.ranking.registry import ModelRegistry
from recsys.serving.pipeline import open_pipeline
from recsys.serving.server import RunningServer
from recsys.simulation.simulator import SimulatedWorld, Simulation, longest_tail_seconds
from tests.simulation.conftest import quick, serve_settings, simulated_world

__all__ = ["simulated_world"]

NAME = "ranker"
QUICK_POLICY = CanaryPolicy(
    margin=0.5, min_requests_per_step=30, ramp=(50.0, 100.0), max_p99_ms=60_000.0
)
"""A wide margin and short steps: an equal canary decides within a few hundred requests. No
latency guardrail to speak of: a test machine's p99 is noise, not the canary's doing."""


def _as_good_as_production(artifacts: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """The production recipe trained again with another seed: a canary as good as production
    (registering the same file again would be the production version itself)."""
    code = main(["models", "train", "--artifacts", str(artifacts), "--seed", "5", "--no-tracking"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out.strip().splitlines()[-1]


async def _canary(
    artifacts: Path,
    logs: Path,
    world: SimulatedWorld,
    version: str,
    policy: CanaryPolicy,
) -> tuple[str, list[str], ModelRegistry]:
    running = await RunningServer.start(
        serve_settings(artifacts, logs / "exposures", control_poll_seconds=0.2), open_pipeline
    )
    store = open_store("", artifacts)
    registry = ModelRegistry(ArtifactRoot(artifacts), store, author="test")
    try:
        await running.wait_ready()
        registry.canary(NAME, version, policy.ramp[0])
        settings = quick(f"127.0.0.1:{running.port}", logs / "outcomes", minutes=60.0, users=800)
        sources = LogSources(
            logs / "exposures",
            logs / "outcomes",
            late_seconds=longest_tail_seconds(settings.speed),
            metrics_url=f"http://127.0.0.1:{running.metrics_port}/metrics",
        )
        controller = CanaryController(registry, policy, sources, min_scores=200)
        state = controller.begin(NAME, version, policy.ramp[0])
        seen: list[str] = []
        simulation = asyncio.create_task(Simulation(settings, world).run())
        state, decision = await asyncio.to_thread(
            controller.run,
            state,
            look_seconds=1.0,
            max_seconds=60.0,
            say=lambda d: seen.append(f"{d.action}: {d.reason}"),
        )
        report = await simulation
        assert sum(report.errors.values()) == 0
    finally:
        await running.stop()
    return decision.action, seen, registry


async def test_a_canary_as_good_as_production_is_promoted_with_its_decision_recorded(
    artifacts: Path,
    built_world: tuple[Path, BuildReport],
    simulated_world: SimulatedWorld,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    production = built_world[1].model_version
    version = _as_good_as_production(artifacts, capsys)
    action, seen, registry = await _canary(
        artifacts, tmp_path / "logs", simulated_world, version, QUICK_POLICY
    )
    try:
        assert action == "promote", seen
        table, _ = registry.routing()
        assert table.models[NAME].production == version
        assert table.models[NAME].previous == production
        (entry,) = registry.decisions(NAME)
        assert entry["decision"] == "canary-promote"
        evidence = entry["evidence"]
        assert evidence["p_noninferior"] <= QUICK_POLICY.alpha
        assert evidence["canary_requests"] > 0
        assert evidence["champion_requests"] > 0
        assert evidence["guardrails"]["error_rate"][0] == 0.0
    finally:
        registry.store.close()
    code = main(["models", "history", "--artifacts", str(artifacts), "--limit", "1"])
    assert code == 0
    assert "canary analysis: not worse than the champion" in capsys.readouterr().out


async def test_a_guardrail_breach_rolls_the_canary_back_and_leaves_production(
    artifacts: Path,
    built_world: tuple[Path, BuildReport],
    simulated_world: SimulatedWorld,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    production = built_world[1].model_version
    version = _as_good_as_production(artifacts, capsys)
    strict = replace(QUICK_POLICY, max_score_psi=0.0)  # any movement of the scores breaches
    action, seen, registry = await _canary(
        artifacts, tmp_path / "logs", simulated_world, version, strict
    )
    try:
        assert action == "rollback", seen
        table, _ = registry.routing()
        assert table.models[NAME].production == production
        assert not table.models[NAME].canary
        (entry,) = registry.decisions(NAME)
        assert entry["decision"] == "canary-rollback"
        assert "score PSI" in entry["reason"]
        assert json.dumps(entry)  # a plain JSON record
    finally:
        registry.store.close()
