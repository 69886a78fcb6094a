"""The registry on a real built world: versions, validation, routing writes, retirement."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.artifacts import ArtifactRoot
from recsys.build import BuildReport
from recsys.control.backends import open_store
from recsys.control.store import DocumentStore
from recsys.ranking.features import FEATURE_NAMES
from recsys.ranking.registry import ModelRegistry, RegistryError, load_for_serving
from recsys.ranking.routing import RoutingTable, arm_pins, parse_routing

NAME = "ranker"


@pytest.fixture(scope="module")
def trained_root(
    built_world: tuple[Path, BuildReport], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str, str]:
    """A copy of the built root with a second ranker version (another seed), not yet routed."""
    out = tmp_path_factory.mktemp("registry") / "artifacts"
    shutil.copytree(built_world[0], out)
    store = open_store("", out)
    try:
        second = ModelRegistry(ArtifactRoot(out), store).train(NAME, seed=99)
    finally:
        store.close()
    return out, built_world[1].model_version, second


@pytest.fixture
def root(trained_root: tuple[Path, str, str], tmp_path: Path) -> Path:
    out = tmp_path / "artifacts"
    shutil.copytree(trained_root[0], out)
    return out


@pytest.fixture
def store(root: Path) -> Iterator[DocumentStore]:
    s = open_store("", root)
    yield s
    s.close()


@pytest.fixture
def registry(root: Path, store: DocumentStore) -> ModelRegistry:
    return ModelRegistry(ArtifactRoot(root), store, author="test")


@pytest.fixture
def versions(trained_root: tuple[Path, str, str]) -> tuple[str, str]:
    return trained_root[1], trained_root[2]


def _route(store: DocumentStore) -> dict[str, object]:
    document = store.read("routing")
    assert document is not None
    route: dict[str, object] = document.body["models"][NAME]
    return route


def test_train_registers_a_complete_manifest(
    registry: ModelRegistry, versions: tuple[str, str]
) -> None:
    first, second = versions
    assert first != second
    manifest = registry.manifest(NAME, second)
    assert manifest["content_hash"].startswith(second)
    assert manifest["feature_schema"]["names"] == list(FEATURE_NAMES)
    assert set(manifest["feature_schema"]["types"]) == set(FEATURE_NAMES)
    assert len(manifest["train_fingerprint"]) == 64
    assert manifest["params"]["seed"] == 99
    assert manifest["code_version"]
    assert manifest["metrics"]["ndcg@20.ranker"] > manifest["metrics"]["ndcg@20.popularity"]
    assert len(manifest["golden"]["features"]) == len(manifest["golden"]["scores"]) > 0
    assert set(manifest["baseline"]["features"]) == set(FEATURE_NAMES)
    assert "score" in manifest["baseline"]
    listed = {info.version: info for info in registry.list(NAME)}
    assert listed[first].roles == ("production",)
    assert listed[second].roles == ()


def test_promote_keeps_the_previous_production_and_rollback_flips_back(
    registry: ModelRegistry, store: DocumentStore, versions: tuple[str, str]
) -> None:
    first, second = versions
    registry.promote(NAME, second)
    assert _route(store) == {"production": second, "previous": first}
    registry.rollback(NAME)
    assert _route(store) == {"production": first, "previous": second}
    registry.rollback(NAME)  # a rollback of a rollback goes forward again
    assert _route(store) == {"production": second, "previous": first}
    with pytest.raises(RegistryError, match="already the production"):
        registry.promote(NAME, second)
    history = store.history("routing", limit=3)
    assert [h.author for h in history] == [
        f"test: rollback {NAME} to {second}",
        f"test: rollback {NAME} to {first}",
        f"test: promote {NAME}/{second}",
    ]


def test_rollback_without_a_previous_version_is_refused(registry: ModelRegistry) -> None:
    with pytest.raises(RegistryError, match="no previous production version"):
        registry.rollback(NAME)


def test_canary_routes_a_stable_share_of_users(
    registry: ModelRegistry, store: DocumentStore, versions: tuple[str, str]
) -> None:
    first, second = versions
    registry.canary(NAME, second, 20)
    assert _route(store) == {"production": first, "canary": {"version": second, "percent": 20.0}}
    document = store.read("routing")
    assert document is not None
    table = parse_routing(document.body)
    users = [f"user-{n:07d}" for n in range(5000)]
    chosen = [table.resolve(NAME, u) for u in users]
    share = chosen.count(second) / len(users)
    assert 0.17 < share < 0.23
    assert chosen == [table.resolve(NAME, u) for u in users]  # per user, not per request
    assert table.resolve(NAME, users[0], pinned="pinned-version") == "pinned-version"
    registry.canary(NAME, second, 0)
    assert _route(store) == {"production": first}


@settings(max_examples=50, deadline=None)
@given(user=st.text(min_size=1, max_size=30), percent=st.floats(0.01, 100.0))
def test_canary_choice_is_deterministic_and_monotone_in_the_share(
    user: str, percent: float
) -> None:
    def table(p: float) -> RoutingTable:
        canary = {"version": "b", "percent": p}
        body = {"index": "i", "models": {NAME: {"production": "a", "canary": canary}}}
        return parse_routing(body)

    low = table(percent)
    assert low.resolve(NAME, user) == low.resolve(NAME, user)
    if low.resolve(NAME, user) == "b":  # a user on the canary stays on it as it ramps up
        assert table(min(100.0, percent * 2)).resolve(NAME, user) == "b"


def test_retire_refuses_routed_and_pinned_versions_and_deletes_others(
    registry: ModelRegistry, store: DocumentStore, root: Path, versions: tuple[str, str]
) -> None:
    first, second = versions
    with pytest.raises(RegistryError, match=r"still routed \(production\)"):
        registry.retire(NAME, first)
    registry.canary(NAME, second, 5)
    with pytest.raises(RegistryError, match="canary 5%"):
        registry.retire(NAME, second)
    registry.canary(NAME, second, 0)
    registry.promote(NAME, second)
    with pytest.raises(RegistryError, match="previous"):
        registry.retire(NAME, first)
    registry.promote(NAME, first)
    experiments = store.read("experiments")
    assert experiments is not None
    body = _pin_in_an_arm(experiments.body, second)
    store.write("experiments", body, expected_version=experiments.version, author="test")
    assert arm_pins(body) == {NAME: {second: {"pin-test/pinned"}}}
    with pytest.raises(RegistryError, match="pinned by pin-test/pinned"):
        registry.retire(NAME, second)
    store.write(
        "experiments", experiments.body, expected_version=experiments.version + 1, author="t"
    )
    routing = store.read("routing")
    assert routing is not None
    assert routing.body["models"][NAME]["previous"] == second
    store.write(
        "routing",
        {**routing.body, "models": {NAME: {"production": first}}},
        expected_version=routing.version,
        author="test",
    )
    registry.retire(NAME, second)
    assert not (root / "models" / NAME / second).exists()
    assert not (root / "compiled" / NAME / second).exists()
    assert [v.version for v in registry.list(NAME)] == [first]


def _pin_in_an_arm(body: dict[str, Any], version: str) -> dict[str, Any]:
    """``body`` plus a layer whose experiment has an arm pinned to ``version`` (all traffic)."""
    layers = list(body["layers"])
    layers.append(
        {
            "name": "pin-layer",
            "salt": "pin-layer",
            "launch_defaults": {},
            "experiments": [
                {
                    "name": "pin-test",
                    "status": "running",
                    "epoch": 0,
                    "buckets": [[0, 10_000]],
                    "arms": [
                        {"name": "control", "weight": 1, "params": {}},
                        {"name": "pinned", "weight": 1, "params": {"model_version": version}},
                    ],
                }
            ],
        }
    )
    return {**body, "layers": layers}


def test_a_corrupt_version_is_refused_with_the_reason(
    registry: ModelRegistry, store: DocumentStore, root: Path, versions: tuple[str, str]
) -> None:
    _, second = versions
    model_file = root / "models" / NAME / second / "model.txt"
    model_file.write_text(model_file.read_text().replace("leaf_value=", "leaf_value=1", 1))
    before = store.read("routing")
    with pytest.raises(RegistryError, match=r"failed validation.*do not match the manifest"):
        registry.promote(NAME, second)
    with pytest.raises(RegistryError, match="failed validation"):
        registry.canary(NAME, second, 10)
    assert store.read("routing") == before


def test_a_slow_version_is_refused_by_the_latency_budget(
    root: Path, store: DocumentStore, versions: tuple[str, str]
) -> None:
    strict = ModelRegistry(ArtifactRoot(root), store, latency_budget_us=1e-6)
    with pytest.raises(RegistryError, match=r"µs per row .* over the budget"):
        strict.promote(NAME, versions[1])


def test_register_refuses_corrupt_and_incompatible_files(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.txt"
    garbage.write_text("tree\nnot a model at all\n")
    with pytest.raises(RegistryError, match="not a LightGBM text model"):
        registry.register(NAME, garbage)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(RegistryError, match="cannot read it as text"):
        registry.register(NAME, binary)
    rng = np.random.default_rng(0)
    x = rng.random((200, 3))
    other = lgb.train(
        {"objective": "regression", "verbosity": -1, "num_threads": 1},
        lgb.Dataset(x, label=x[:, 0], feature_name=["a", "b", "c"]),
        num_boost_round=3,
    )
    wrong_schema = tmp_path / "wrong.txt"
    other.save_model(wrong_schema)
    with pytest.raises(RegistryError, match="incompatible feature schema"):
        registry.register(NAME, wrong_schema)


def test_register_accepts_a_model_trained_elsewhere(
    registry: ModelRegistry, root: Path, tmp_path: Path
) -> None:
    rng = np.random.default_rng(1)
    x = rng.random((500, len(FEATURE_NAMES))).astype(np.float32)
    external = lgb.train(
        {"objective": "regression", "verbosity": -1, "num_threads": 1, "num_leaves": 7},
        lgb.Dataset(x, label=x[:, 0] + x[:, 1], feature_name=list(FEATURE_NAMES)),
        num_boost_round=5,
    )
    path = tmp_path / "external.txt"
    external.save_model(path)
    version = registry.register(NAME, path)
    manifest = json.loads((root / "models" / NAME / version / "manifest.json").read_text())
    assert manifest["train_fingerprint"].startswith("external:")
    assert manifest["num_trees"] == 5
    assert manifest["params"] == {"trained": "elsewhere"}
    model, _ = load_for_serving(ArtifactRoot(root), NAME, version)
    golden = np.asarray(manifest["golden"]["features"], dtype=np.float32)
    assert np.allclose(model.predict(golden), external.predict(golden), atol=1e-6)
