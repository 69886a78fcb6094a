"""The committed gRPC code must be what `make proto` generates from protos/ today."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = [
    "recommender_pb2.py",
    "recommender_pb2.pyi",
    "recommender_pb2_grpc.py",
    "recommender_pb2_grpc.pyi",
]


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    if shutil.which("protoc-gen-mypy", path=str(bin_dir)) is None:
        pytest.fail("protoc-gen-mypy is missing: install the dev extras (pip install -e '.[dev]')")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'protos'}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--mypy_out={tmp_path}",
            f"--mypy_grpc_out={tmp_path}",
            str(ROOT / "protos/recsys/v1/recommender.proto"),
        ],
        check=True,
        env=env,
    )
    stale = [
        name
        for name in GENERATED
        if (tmp_path / "recsys/v1" / name).read_bytes() != (ROOT / "recsys/v1" / name).read_bytes()
    ]
    assert not stale, f"recsys/v1/{stale} are stale: run `make proto` and commit the result"
