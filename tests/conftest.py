"""Shared fixtures: one small real world, built once per test session by `recsys build`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import settings

from benchmarks.bench_rank_cut import load_state
from recsys.build import BuildReport, build
from recsys.pipeline.snapshot import ServingSnapshot
from recsys.settings import BuildSettings

# No per-example deadline: on a shared, loaded machine an example's wall time is noise, and a
# deadline is a timing assertion (a slow example failed property tests that were correct).
settings.register_profile("no-deadline", deadline=None)
settings.load_profile("no-deadline")

SMALL_WORLD = BuildSettings(skus=4_000, users=1_500, seed=11, dim=16, progress=False)


@pytest.fixture(scope="session")
def built_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BuildReport]:
    """A small artifact root with world, vectors, index, ranker and control documents."""
    out = tmp_path_factory.mktemp("artifacts")
    settings = BuildSettings(**{**SMALL_WORLD.__dict__, "out": out})
    report = build(settings, say=lambda _msg: None)
    return out, report


@pytest.fixture(scope="session")
def artifacts_dir(built_world: tuple[Path, BuildReport]) -> Path:
    return built_world[0]


@pytest.fixture
def artifacts(artifacts_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the built root, for tests that change control documents or write
    exposure logs (the session's root stays as built)."""
    out = tmp_path / "artifacts"
    shutil.copytree(artifacts_dir, out, ignore=shutil.ignore_patterns("exposures"))
    return out


@pytest.fixture(scope="session")
def serving_snapshot(artifacts_dir: Path) -> ServingSnapshot:
    """The serving snapshot of the session's built root, as a server compiles it at start-up
    from the control documents the build wrote (immutable: tests share it)."""
    return load_state(artifacts_dir)
