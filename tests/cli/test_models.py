"""`recsys models` end to end: a built world, the real CLI, the file store and a real Redis."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from recsys.build import BuildReport
from recsys.control.backends import open_store
from tests.cli.cli_helpers import run_cli
from tests.control.redis_helpers import redis_prefix, redis_url

__all__ = ["redis_prefix", "redis_url"]

NAME = "ranker"


def _route(artifacts: Path, url: str = "", prefix: str = "recsys:") -> dict[str, object]:
    store = open_store(url, artifacts, prefix=prefix)
    try:
        document = store.read("routing")
    finally:
        store.close()
    assert document is not None
    route: dict[str, object] = document.body["models"][NAME]
    return route


def test_train_promote_canary_rollback_list_retire(
    artifacts: Path, built_world: tuple[Path, BuildReport], capsys: pytest.CaptureFixture[str]
) -> None:
    first = built_world[1].model_version
    a = ("--artifacts", str(artifacts))
    code, out, _ = run_cli(capsys, "models", "train", *a, "--name", NAME, "--seed", "5")
    assert code == 0
    second = out.strip().splitlines()[-1]
    assert (artifacts / "models" / NAME / second / "model.txt").is_file()
    assert "engine lleaves" in out

    code, out, _ = run_cli(capsys, "models", "canary", *a, NAME, second, "--percent", "25")
    assert code == 0
    assert f"canary {second} 25%" in out
    code, out, _ = run_cli(capsys, "models", "promote", *a, NAME, second)
    assert code == 0
    assert _route(artifacts) == {"production": second, "previous": first}
    code, out, _ = run_cli(capsys, "models", "list", *a)
    assert f"{first}" in out
    assert f"{second}" in out
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert lines[second].endswith("production")
    assert lines[first].endswith("previous")

    code, out, err = run_cli(capsys, "models", "retire", *a, NAME, first)
    assert code == 2
    assert "still routed (previous)" in err
    code, out, _ = run_cli(capsys, "models", "rollback", *a, NAME)
    assert code == 0
    assert _route(artifacts) == {"production": first, "previous": second}
    code, out, _ = run_cli(capsys, "models", "show", *a, NAME, second)
    assert code == 0
    assert '"roles": [\n    "previous"\n  ]' in out
    code, out, _ = run_cli(capsys, "models", "history", *a, "--limit", "2")
    assert f"rollback {NAME} to {first}" in out


def test_register_refuses_a_corrupt_file_with_the_reason(
    artifacts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "model.txt"
    bad.write_text("this is not a model\n")
    code, out, err = run_cli(
        capsys, "models", "register", "--artifacts", str(artifacts), "--model-file", str(bad)
    )
    assert code == 2
    assert out == ""
    assert f"--model-file {bad}: not a LightGBM text model" in err


def test_promote_of_a_version_that_fails_validation_changes_nothing(
    artifacts: Path, built_world: tuple[Path, BuildReport], capsys: pytest.CaptureFixture[str]
) -> None:
    version = built_world[1].model_version
    copy = artifacts / "models" / NAME / "bad0bad0bad0"
    shutil.copytree(artifacts / "models" / NAME / version, copy)
    model = copy / "model.txt"
    model.write_text(model.read_text().replace("leaf_value=", "leaf_value=9", 1))
    before = _route(artifacts)
    code, _, err = run_cli(
        capsys, "models", "promote", "--artifacts", str(artifacts), NAME, "bad0bad0bad0"
    )
    assert code == 2
    assert "failed validation and will not serve" in err
    assert "do not match the manifest" in err
    assert _route(artifacts) == before


def test_routing_in_redis(
    artifacts: Path,
    built_world: tuple[Path, BuildReport],
    redis_url: str,
    redis_prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    first = built_world[1].model_version
    file_store = open_store("", artifacts)
    redis_store = open_store(redis_url, artifacts, prefix=redis_prefix)
    try:
        for name in ("routing", "experiments"):
            document = file_store.read(name)
            assert document is not None
            redis_store.write(name, document.body, expected_version=0, author="test")
    finally:
        file_store.close()
        redis_store.close()
    a = ("--artifacts", str(artifacts), "--control", redis_url, "--control-prefix", redis_prefix)
    code, out, _ = run_cli(capsys, "models", "train", *a, "--seed", "6", "--no-compile")
    assert code == 0
    second = out.strip().splitlines()[-1]
    assert "engine lightgbm (compilation off)" in out
    code, out, _ = run_cli(capsys, "models", "promote", *a, NAME, second)
    assert code == 0
    assert out.startswith("routing version 2:")
    assert _route(artifacts, redis_url, redis_prefix) == {"production": second, "previous": first}
    assert _route(artifacts) == {"production": first}  # the file store was not the target
