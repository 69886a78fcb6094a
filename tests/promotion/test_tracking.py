"""MLflow tracking against a real sqlite tracking store in a temporary artifact root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from recsys.build import BuildReport
from recsys.settings import TrackingSettings
from tests.cli.cli_helpers import run_cli

NAME = "ranker"


def _client(artifacts: Path) -> MlflowClient:
    uri = TrackingSettings(artifacts=artifacts).store_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _mlflow_version(client: MlflowClient, version: str) -> str:
    for mv in client.search_model_versions(f"name = '{NAME}'"):
        if mv.tags.get("recsys.version") == version:
            return str(mv.version)
    raise AssertionError(f"{version} is not an MLflow model version")


def test_train_canary_promote_are_runs_versions_and_aliases(
    artifacts: Path, built_world: tuple[Path, BuildReport], capsys: pytest.CaptureFixture[str]
) -> None:
    first = built_world[1].model_version
    a = ("--artifacts", str(artifacts))
    code, out, err = run_cli(capsys, "models", "train", *a, "--seed", "5")
    assert code == 0, err
    second = out.strip().splitlines()[-1]
    assert "warning" not in err

    client = _client(artifacts)
    assert (artifacts / "mlflow" / "mlflow.db").is_file()
    experiment = client.get_experiment_by_name("recsys")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == f"train {NAME}/{second}"
    assert run.data.metrics["ndcg_at_20.ranker"] > 0
    assert run.data.params["seed"] == "5"
    assert run.data.tags["recsys.world_version"]
    files = {f.path for f in client.list_artifacts(run.info.run_id, "model")}
    assert files == {"model/model.txt", "model/manifest.json"}

    code, _, err = run_cli(capsys, "models", "canary", *a, NAME, second, "--percent", "5")
    assert code == 0, err
    model = client.get_registered_model(NAME)
    assert model.aliases == {
        "champion": int(_mlflow_version(client, first)),
        "challenger": int(_mlflow_version(client, second)),
    }

    code, _, err = run_cli(capsys, "models", "promote", *a, NAME, second)
    assert code == 0, err
    model = client.get_registered_model(NAME)
    assert model.aliases == {"champion": int(_mlflow_version(client, second))}
    mv = client.get_model_version(NAME, _mlflow_version(client, second))
    assert mv.tags["recsys.decision"] == "passed"
    decisions = [f.path for f in client.list_artifacts(run.info.run_id, "decisions")]
    assert len(decisions) == 2  # the canary's verdict and the promotion's
    assert all(d.endswith("-passed.json") for d in decisions)

    code, _, err = run_cli(capsys, "models", "rollback", *a, NAME)
    assert code == 0, err
    model = client.get_registered_model(NAME)
    assert model.aliases == {"champion": int(_mlflow_version(client, first))}


def test_no_tracking_leaves_no_store(artifacts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(
        capsys, "models", "train", "--artifacts", str(artifacts), "--seed", "6", "--no-tracking"
    )
    assert code == 0, err
    assert not (artifacts / "mlflow").exists()


def test_an_unusable_tracking_store_is_a_warning_not_a_failure(
    artifacts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    code, out, err = run_cli(
        capsys,
        "models",
        "train",
        "--artifacts",
        str(artifacts),
        "--seed",
        "6",
        "--tracking-uri",
        f"sqlite:///{not_a_directory}/mlflow.db",
    )
    assert code == 0
    assert out.strip().splitlines()[-1]
    assert "recsys: warning: MLflow" in err


def test_serving_and_the_cli_do_not_import_mlflow() -> None:
    code = (
        "import sys, recsys.serving.server, recsys.pipeline.loading, recsys.cli.main\n"
        "assert 'mlflow' not in sys.modules, 'mlflow imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
