"""benchmarks/bench_verify.py on the built test world: one real run of the command, and a
flipped byte that only the verifying modes catch."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench_verify import main, modes_of, sha256_only_root
from recsys.artifacts import FAST_FILES, MANIFEST, ArtifactRoot, read_manifest, verify

ROOT = Path(__file__).resolve().parents[1]


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_each_mode_reports_its_rounds_the_hashed_files_and_the_load_average(
    artifacts_dir: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_verify", "--artifacts", str(artifacts_dir),
         "--rounds", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    rows = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert [row["mode"] for row in rows] == ["trust", "verify", "sha256"]
    root = ArtifactRoot(artifacts_dir)
    for row in rows:
        assert row["index_version"] == root.latest(root.indexes).name
        assert row["rounds"] == 2
        assert len(row["seconds"]) == 2
        assert 0 < row["min_s"] <= row["median_s"]
        assert row["hashed_mb"] > 0
        assert row["index_mb"] > 0
        assert len(row["load_before"]) == len(row["load_after"]) == 3
    assert list(artifacts_dir.parent.glob(".bench-verify-*")) == []  # the sha256 root is gone


def test_a_flipped_byte_in_the_features_is_caught_by_the_verifying_modes_only(
    artifacts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = ArtifactRoot(artifacts)
    flip_last_byte(root.lineage(root.latest(root.indexes).name).features_dir / "user_vectors.npy")
    args = ["--artifacts", str(artifacts), "--rounds", "1", "--modes"]

    main([*args, "trust"])
    assert json.loads(capsys.readouterr().out)["mode"] == "trust"
    for mode in ("verify", "sha256"):
        with pytest.raises(SystemExit) as refused:
            main([*args, f"trust,{mode}"])
        assert str(refused.value).startswith(f"{mode}: index ")
        assert "changed ['user_vectors.npy']" in str(refused.value)
        assert capsys.readouterr().out == ""


def test_the_sha256_root_links_the_same_files_under_manifests_without_the_fast_hashes(
    artifacts_dir: Path, tmp_path: Path
) -> None:
    root = ArtifactRoot(artifacts_dir)
    lineage = root.lineage(root.latest(root.indexes).name)

    old = sha256_only_root(root, lineage, tmp_path / "old")

    for kind, directory in [
        ("indexes", lineage.index_dir),
        ("features", lineage.features_dir),
        ("world", lineage.world_dir),
    ]:
        copy = old.path / kind / directory.name
        assert FAST_FILES in read_manifest(directory)
        assert FAST_FILES not in read_manifest(copy)
        data = [p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST]
        assert data
        for path in data:
            assert (copy / path.relative_to(directory)).stat().st_ino == path.stat().st_ino
        verify(copy)  # with sha256 alone, it still matches


@pytest.mark.parametrize("text", ["", "trust,fast", "sha1"])
def test_modes_must_be_known(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="--modes"):
        modes_of(text)
