"""The loop's steps on a real registry: a challenger the gates refuse stays off the canary
unless forced, and the force is recorded like ``recsys models canary --force``; a canary's
analysis state is recovered from the routing history after a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.artifacts import ArtifactRoot
from recsys.control.backends import open_store
from recsys.promotion.controller import LogSources
from recsys.promotion.judge import run_gates
from recsys.promotion.loop import resume, start_canary
from recsys.promotion.policy import load_policy
from recsys.ranking.registry import ModelRegistry
from tests.cli.test_models_gates import _noise_model

NAME = "ranker"


@pytest.fixture
def registry(artifacts: Path) -> ModelRegistry:
    return ModelRegistry(ArtifactRoot(artifacts), open_store("", artifacts), author="test")


def test_a_refused_challenger_is_forced_onto_the_canary_only_when_asked(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    bad = registry.register(NAME, _noise_model(tmp_path / "noise.txt"))
    report = run_gates(registry, NAME, bad, load_policy(None))
    assert not report.passed
    before, _ = registry.routing()
    logged: list[tuple[str, str]] = []

    def on_record(version: str, entry: dict[str, object]) -> None:
        logged.append((version, str(entry["decision"])))

    assert start_canary(registry, report, 5.0, on_record=on_record) is None
    assert registry.routing()[0] == before

    document = start_canary(registry, report, 5.0, force=True, on_record=on_record)
    assert document is not None
    route = registry.routing()[0].models[NAME]
    assert (route.canary, route.canary_percent, route.production) == (
        bad,
        5.0,
        before.models[NAME].production,
    )
    assert [d["decision"] for d in registry.decisions(NAME)] == ["forced", "refused"]
    assert logged == [(bad, "refused"), (bad, "forced")]
    (change,) = registry.store.history("routing", limit=1)
    assert "forced past failed gates" in change.author


def test_a_restarted_controller_resumes_a_canary_from_the_routing_history(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    version = registry.train(NAME, seed=5)
    production = registry.routing()[0].models[NAME].production
    registry.canary(NAME, version, 5.0)
    started = registry.store.history("routing", limit=1)[0].updated_at
    registry.canary(NAME, version, 50.0)
    stepped = registry.store.history("routing", limit=1)[0].updated_at
    sources = LogSources(tmp_path / "exposures", tmp_path / "outcomes", late_seconds=1.0)

    state = resume(registry, sources, NAME, version, production, now=stepped + 60.0)

    assert (state.version, state.champion, state.percent) == (version, production, 50.0)
    assert state.started_at == started
    assert state.step_started_at == stepped
    assert state.step_start_requests == 0  # nothing logged


def test_a_canary_ended_and_started_again_is_a_new_canary(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    version = registry.train(NAME, seed=5)
    production = registry.routing()[0].models[NAME].production
    registry.canary(NAME, version, 5.0)
    registry.canary(NAME, version, 0.0)
    registry.canary(NAME, version, 5.0)
    restarted = registry.store.history("routing", limit=1)[0].updated_at
    sources = LogSources(tmp_path / "exposures", tmp_path / "outcomes", late_seconds=1.0)

    state = resume(registry, sources, NAME, version, production, now=restarted + 1.0)

    assert state.started_at == restarted == state.step_started_at
