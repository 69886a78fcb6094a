"""`recsys models` refuses names and versions that would reach outside the model registry.

Through the real CLI on a private copy of the built world: a refused name or version exits 2 with
one line naming the field, and nothing on disk changes (the live index, a directory outside the
artifact root, the routing document).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsys.build import BuildReport
from tests.cli.cli_helpers import run_cli, stored_routing

NAME = "ranker"


def _fake_version(directory: Path) -> Path:
    """A directory that looks like a version to the registry (it has a manifest)."""
    directory.mkdir(parents=True)
    (directory / "manifest.json").write_text(json.dumps({"kind": "ranking-model"}))
    (directory / "precious.txt").write_text("keep me\n")
    return directory


def test_retire_of_the_live_index_through_a_model_name_is_refused(
    artifacts: Path, built_world: tuple[Path, BuildReport], capsys: pytest.CaptureFixture[str]
) -> None:
    index = built_world[1].index_version
    live = artifacts / "indexes" / index
    files = sorted(p.name for p in live.iterdir())
    before = stored_routing(artifacts)

    code, out, err = run_cli(
        capsys, "models", "retire", "--artifacts", str(artifacts), "../indexes", index
    )

    assert code == 2
    assert "retired" not in out
    assert err.startswith("recsys: model name '../indexes': expected ")
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in live.iterdir()) == files
    assert stored_routing(artifacts) == before


def test_retire_of_a_directory_outside_the_root_is_refused(
    artifacts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = _fake_version(tmp_path / "victim" / "v1")
    assert (artifacts / "models" / "../../victim" / "v1").resolve() == victim.resolve()

    code, out, err = run_cli(
        capsys, "models", "retire", "--artifacts", str(artifacts), "../../victim", "v1"
    )

    assert code == 2
    assert out == ""
    assert err.startswith("recsys: model name '../../victim': expected ")
    assert (victim / "precious.txt").read_text() == "keep me\n"


def test_retire_of_a_version_that_climbs_out_of_its_model_is_refused(
    artifacts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = _fake_version(tmp_path / "victim")
    version = "../../../victim"
    assert (artifacts / "models" / NAME / version).resolve() == victim.resolve()

    code, out, err = run_cli(
        capsys, "models", "retire", "--artifacts", str(artifacts), NAME, version
    )

    assert code == 2
    assert out == ""
    assert err.startswith(f"recsys: model version {version!r}: expected ")
    assert (victim / "precious.txt").is_file()


def test_show_does_not_read_a_manifest_outside_the_registry(
    artifacts: Path, built_world: tuple[Path, BuildReport], capsys: pytest.CaptureFixture[str]
) -> None:
    index = built_world[1].index_version
    a = ("--artifacts", str(artifacts))

    code, out, err = run_cli(capsys, "models", "show", *a, "../indexes", index)
    assert code == 2
    assert out == ""
    assert err.startswith("recsys: model name '../indexes': expected ")

    code, out, err = run_cli(capsys, "models", "show", *a, NAME, f"../../indexes/{index}")
    assert code == 2
    assert out == ""
    assert "model version '../../indexes/" in err


@pytest.mark.parametrize(
    "argv",
    [
        ("list", "../indexes"),
        ("promote", "../indexes", "000000000000"),
        ("canary", NAME, "../../indexes", "--percent", "5"),
        ("rollback", "../../x"),
        ("register", "--name", "../x", "--model-file", "model.txt"),
        ("train", "--name", "Ranker/../../x"),
    ],
)
def test_every_action_refuses_a_name_or_version_that_is_not_an_id(
    artifacts: Path, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]
) -> None:
    before = sorted(p.relative_to(artifacts) for p in artifacts.rglob("*"))

    code, out, err = run_cli(capsys, "models", argv[0], "--artifacts", str(artifacts), *argv[1:])

    assert code == 2
    assert out == ""
    assert err.startswith("recsys: model ")
    assert "expected " in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.relative_to(artifacts) for p in artifacts.rglob("*")) == before
