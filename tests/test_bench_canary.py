"""The served mode of benchmarks/bench_canary.py, one short A/A trial on the small world: a real
server, a fresh canary version of the production model, simulated users, the real controller."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks.canary_served import ServedSettings, load_results, run_served, summary, variant
from recsys.artifacts import ArtifactRoot
from recsys.control.backends import open_store
from recsys.promotion.policy import CanaryPolicy
from recsys.ranking.model import load_model_version
from recsys.ranking.registry import ModelRegistry


async def test_an_aa_trial_canaries_the_same_trees_as_a_new_version_and_judges_real_traffic(
    artifacts_dir: Path, tmp_path: Path
) -> None:
    settings = ServedSettings(
        worlds=(artifacts_dir,),
        work=tmp_path / "work",
        results=tmp_path / "results.jsonl",
        policy=CanaryPolicy(ramp=(50.0, 100.0), min_requests_per_step=50),
        policy_source="test",
        aa_runs=1,
        worse_runs=0,
        users=300,
        rate=20.0,
        speed=600.0,  # events land within 1.5 s: the controller sees complete requests soon
        look_seconds=1.0,
        max_seconds=8.0,
    )
    [trial] = await run_served(settings)
    assert load_results(settings.results) == [trial]
    assert trial.kind == "A/A"
    assert trial.version != trial.champion
    assert trial.requests_served > 0
    assert trial.failed_requests == 0
    assert trial.canary_requests > 0
    assert trial.champion_requests > 0
    assert trial.outcome in ("promote", "rollback", "undecided")
    assert summary([trial])[0].startswith("A/A: 1 runs on 1 worlds")

    root = settings.work / "world-0" / "artifacts"
    registry = ModelRegistry(ArtifactRoot(root), open_store("", root))
    route = registry.routing()[0].models["ranker"]
    if trial.outcome == "promote":
        assert route.production == trial.version
    else:  # rolled back or given up: production untouched, the canary off
        assert (route.production, route.canary) == (trial.champion, "")
    a = load_model_version(registry.root, "ranker", trial.champion).booster
    b = load_model_version(registry.root, "ranker", trial.version).booster
    rows = np.random.default_rng(0).random((200, a.num_feature())).astype(np.float32)
    assert np.array_equal(a.predict(rows), b.predict(rows))
    decisions = registry.decisions("ranker")
    assert all(json.dumps(d) for d in decisions)


def test_a_variant_differs_only_in_the_training_seed_line() -> None:
    text = "tree\n[objective: lambdarank]\n[data_random_seed: 107]\nend of parameters\n"
    other = variant(text, 5)
    assert other != text
    assert other.replace("[data_random_seed: 5]", "[data_random_seed: 107]") == text
