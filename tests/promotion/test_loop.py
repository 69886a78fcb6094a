"""The loop's steps on a real registry: a challenger the gates refuse stays off the canary
unless forced, and the force is recorded like ``recsys models canary --force``."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.artifacts import ArtifactRoot
from recsys.control.backends import open_store
from recsys.promotion.judge import run_gates
from recsys.promotion.loop import start_canary
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
