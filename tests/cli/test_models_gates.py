"""`recsys models promote/canary` run the gates: a worse model is refused with the numbers, and
``--force`` goes through but is written into the routing and decision histories."""

from __future__ import annotations

import json
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest

from recsys.build import BuildReport
from recsys.ranking.features import FEATURE_NAMES
from tests.cli.cli_helpers import run_cli, stored_routing

NAME = "ranker"


def _noise_model(path: Path) -> Path:
    """A LightGBM model of this feature schema that learned nothing (random labels)."""
    rng = np.random.default_rng(0)
    x = rng.random((400, len(FEATURE_NAMES))).astype(np.float32)
    booster = lgb.train(
        {"objective": "regression", "verbosity": -1, "num_threads": 1, "min_data_in_leaf": 5},
        lgb.Dataset(x, label=rng.random(400), feature_name=list(FEATURE_NAMES)),
        num_boost_round=20,
    )
    booster.save_model(str(path))
    return path


def test_a_worse_model_is_refused_with_the_numbers_unless_forced(
    artifacts: Path,
    built_world: tuple[Path, BuildReport],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    champion = built_world[1].model_version
    a = ("--artifacts", str(artifacts))
    code, out, err = run_cli(
        capsys, "models", "register", *a, "--model-file", str(_noise_model(tmp_path / "m.txt"))
    )
    assert code == 0, err
    bad = out.strip().splitlines()[-1]
    before = stored_routing(artifacts)

    code, out, err = run_cli(capsys, "models", "promote", *a, NAME, bad)
    assert code == 2
    assert f"promote {NAME}/{bad}: refused" in err
    failed = next(line for line in err.splitlines() if "FAIL offline ndcg@20 overall" in line)
    assert "champion 0." in failed
    assert "challenger 0." in failed
    assert "--force overrides" in err
    assert stored_routing(artifacts) == before

    code, _, err = run_cli(capsys, "models", "canary", *a, NAME, bad, "--percent", "5")
    assert code == 2
    assert "refused" in err
    assert stored_routing(artifacts) == before

    code, out, err = run_cli(capsys, "models", "gates", *a, NAME, bad)
    assert code == 1
    assert "failed" in out.splitlines()[0]
    assert "FAIL offline ndcg@20 overall" in out

    code, out, err = run_cli(capsys, "models", "promote", *a, NAME, bad, "--force")
    assert code == 0, err
    assert f"production {bad}, previous {champion}" in out
    code, out, _ = run_cli(capsys, "models", "history", *a, "--limit", "1")
    assert f"promote {NAME}/{bad} (forced past failed gates: offline ndcg@20 overall" in out

    code, out, _ = run_cli(capsys, "models", "decisions", *a, NAME, "--json")
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["decision"] for r in records] == ["forced", "refused", "refused"]
    assert records[0]["action"] == f"promote {NAME}/{bad}"
    assert records[0]["gates"]["champion"] == champion
    assert records[0]["gates"]["passed"] is False
    assert (artifacts / "models" / NAME / "decisions.jsonl").stat().st_mode & 0o777 == 0o600


def test_a_model_as_good_as_production_passes_the_gates(
    artifacts: Path, built_world: tuple[Path, BuildReport], capsys: pytest.CaptureFixture[str]
) -> None:
    a = ("--artifacts", str(artifacts))
    code, out, _ = run_cli(capsys, "models", "train", *a, "--name", NAME)  # same seed: same model
    assert code == 0
    version = out.strip().splitlines()[-1]
    policy = artifacts.parent / "policy.toml"
    policy.write_text(
        'format = 1\nrevision = 2\n[[offline.check]]\nmetric = "ndcg@20"\nslice = "overall"\n'
        "max_drop_abs = 0.0\n"
    )
    code, out, err = run_cli(
        capsys, "models", "canary", *a, NAME, version, "--percent", "10", "--policy", str(policy)
    )
    if version == built_world[1].model_version:  # identical bytes: already production
        assert code == 2
        return
    assert code == 0, err
    assert "passed" in err
    assert "revision 2" in err
    assert f"canary {version} 10%" in out
