"""The model cache (load once, refuse bad versions) and the unload grace (an injected clock)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from recsys.artifacts import ArtifactRoot
from recsys.build import BuildReport
from recsys.ranking.model import MODEL_FILE, REJECTION_REASONS, ModelRejected, RankingModel
from recsys.ranking.model_cache import ModelCache, UnloadGrace
from tests.ranking.doubles import Clock, Rejections

NAME = "ranker"
CORRUPT = "c0ffeec0ffee"


@pytest.fixture(scope="module")
def model_version(built_world: tuple[Path, BuildReport]) -> str:
    return built_world[1].model_version


@pytest.fixture(scope="module")
def model(artifacts_dir: Path, model_version: str) -> RankingModel:
    """The built ranker, loaded once for the grace tests (which only pass it around)."""
    return ModelCache(ArtifactRoot(artifacts_dir), compile_models=False).get(NAME, model_version)


@pytest.fixture
def root_with_corrupt_version(artifacts: Path, model_version: str) -> ArtifactRoot:
    """A private root with one more version: a copy of the real one with its model.txt
    overwritten (so it no longer matches its manifest)."""
    root = ArtifactRoot(artifacts)
    corrupt = root.models(NAME) / CORRUPT
    shutil.copytree(root.models(NAME) / model_version, corrupt)
    (corrupt / MODEL_FILE).write_text("tree\nversion=v4\nnot a model\n")
    return root


# -- ModelCache ----------------------------------------------------------------------------------


def test_a_real_version_loads_validated_and_named_after_its_directory(
    artifacts_dir: Path, model_version: str
) -> None:
    cache = ModelCache(ArtifactRoot(artifacts_dir), compile_models=False)

    model = cache.get(NAME, model_version)

    assert (model.name, model.version) == (NAME, model_version)
    assert model.directory == ArtifactRoot(artifacts_dir).models(NAME) / model_version
    assert cache.loaded() == {(NAME, model_version)}


def test_getting_a_version_twice_returns_the_same_loaded_object(
    artifacts_dir: Path, model_version: str
) -> None:
    cache = ModelCache(ArtifactRoot(artifacts_dir), compile_models=False)

    assert cache.get(NAME, model_version) is cache.get(NAME, model_version)


def test_a_cached_version_is_not_read_from_disk_again(artifacts: Path, model_version: str) -> None:
    root = ArtifactRoot(artifacts)
    cache = ModelCache(root, compile_models=False)
    first = cache.get(NAME, model_version)

    shutil.rmtree(root.models(NAME) / model_version)

    assert cache.get(NAME, model_version) is first


def test_a_missing_version_is_rejected_as_missing_without_reporting_a_rejection(
    artifacts_dir: Path,
) -> None:
    rejections = Rejections()
    cache = ModelCache(ArtifactRoot(artifacts_dir), compile_models=False, on_rejected=rejections)

    with pytest.raises(ModelRejected, match="not in the registry") as raised:
        cache.get(NAME, "nosuchversion")

    assert raised.value.reason == "missing"
    assert rejections.calls == []
    assert cache.loaded() == set()


def test_a_missing_model_name_is_rejected_as_missing(
    artifacts_dir: Path, model_version: str
) -> None:
    cache = ModelCache(ArtifactRoot(artifacts_dir), compile_models=False)

    with pytest.raises(ModelRejected) as raised:
        cache.get("no-such-model", model_version)

    assert raised.value.reason == "missing"


@pytest.mark.parametrize("name", ["../../outside", "a/b", "../x"])
def test_a_pinned_name_that_is_not_an_id_is_rejected_as_missing_and_nothing_outside_is_read(
    artifacts: Path, model_version: str, name: str
) -> None:
    # A whole, valid copy of the ranker where "../../outside" leads from models/: a cache that
    # followed the name would load it.
    root = ArtifactRoot(artifacts)
    shutil.copytree(root.models(NAME) / model_version, artifacts.parent / "outside" / model_version)
    rejections = Rejections()
    cache = ModelCache(root, compile_models=False, on_rejected=rejections)

    with pytest.raises(ModelRejected, match=f"model name {name!r}: expected a name") as raised:
        cache.get(name, model_version)

    assert raised.value.reason == "missing"
    assert rejections.calls == []
    assert cache.loaded() == set()


def test_a_corrupt_version_is_rejected_as_corrupt_and_reported(
    root_with_corrupt_version: ArtifactRoot,
) -> None:
    rejections = Rejections()
    cache = ModelCache(root_with_corrupt_version, compile_models=False, on_rejected=rejections)

    with pytest.raises(ModelRejected, match=r"changed \['model.txt'\]") as raised:
        cache.get(NAME, CORRUPT)

    assert raised.value.reason == "corrupt"
    assert rejections.calls == [(NAME, CORRUPT, "corrupt")]


def test_a_rejected_version_is_never_cached_and_is_refused_again(
    root_with_corrupt_version: ArtifactRoot,
) -> None:
    rejections = Rejections()
    cache = ModelCache(root_with_corrupt_version, compile_models=False, on_rejected=rejections)

    for _ in range(2):
        with pytest.raises(ModelRejected):
            cache.get(NAME, CORRUPT)

    assert cache.loaded() == set()
    assert rejections.calls == [(NAME, CORRUPT, "corrupt")] * 2


def test_a_corrupt_version_is_rejected_even_without_a_rejection_callback(
    root_with_corrupt_version: ArtifactRoot,
) -> None:
    cache = ModelCache(root_with_corrupt_version, compile_models=False)

    with pytest.raises(ModelRejected) as raised:
        cache.get(NAME, CORRUPT)

    assert raised.value.reason == "corrupt"


def test_a_version_over_the_latency_budget_is_rejected_with_that_reason(
    artifacts_dir: Path, model_version: str
) -> None:
    rejections = Rejections()
    cache = ModelCache(
        ArtifactRoot(artifacts_dir),
        compile_models=False,
        latency_budget_us=0.0,
        on_rejected=rejections,
    )

    with pytest.raises(ModelRejected, match="over the budget") as raised:
        cache.get(NAME, model_version)

    assert raised.value.reason == "latency"
    assert rejections.calls == [(NAME, model_version, "latency")]
    assert cache.loaded() == set()


def test_keep_only_releases_every_version_not_listed(
    root_with_corrupt_version: ArtifactRoot, model_version: str
) -> None:
    cache = ModelCache(root_with_corrupt_version, compile_models=False)
    first = cache.get(NAME, model_version)

    cache.keep_only([model_version, "something-else"])
    assert cache.loaded() == {(NAME, model_version)}
    assert cache.get(NAME, model_version) is first

    cache.keep_only([])
    assert cache.loaded() == set()
    reloaded = cache.get(NAME, model_version)
    assert reloaded is not first
    assert reloaded.version == first.version


# -- ModelRejected -------------------------------------------------------------------------------


@pytest.mark.parametrize("reason", REJECTION_REASONS)
def test_a_rejection_carries_its_reason_and_message(reason: str) -> None:
    error = ModelRejected("what is wrong", reason=reason)

    assert error.reason == reason
    assert str(error) == "what is wrong"


def test_a_rejection_with_an_unknown_reason_is_refused() -> None:
    with pytest.raises(ValueError, match=r"reason: expected one of .* got 'bored'"):
        ModelRejected("what is wrong", reason="bored")


# -- UnloadGrace ---------------------------------------------------------------------------------


def test_a_needed_version_is_never_in_the_kept_set(model: RankingModel) -> None:
    grace = UnloadGrace(30.0, clock=Clock())

    assert grace.kept({"a": model, "b": model}, needed=["a", "b"]) == {}
    assert not grace.any_expired()


def test_an_unneeded_version_is_kept_within_the_grace_and_dropped_after(
    model: RankingModel,
) -> None:
    clock = Clock()
    grace = UnloadGrace(30.0, clock=clock)
    current = {"old": model, "new": model}

    assert grace.kept(current, needed=["new"]) == {"old": model}
    clock.now += 29.9
    assert grace.kept(current, needed=["new"]) == {"old": model}
    clock.now += 0.1
    assert grace.kept(current, needed=["new"]) == {}


def test_the_grace_counts_from_the_first_time_a_version_was_unneeded(
    model: RankingModel,
) -> None:
    clock = Clock()
    grace = UnloadGrace(30.0, clock=clock)

    grace.kept({"old": model}, needed=[])
    for _ in range(3):  # asking again does not restart the count
        clock.now += 10.0
        kept = grace.kept({"old": model}, needed=[])

    assert kept == {}


def test_a_version_needed_again_starts_its_grace_over_when_it_leaves_again(
    model: RankingModel,
) -> None:
    clock = Clock()
    grace = UnloadGrace(30.0, clock=clock)
    current = {"old": model}

    grace.kept(current, needed=[])  # unneeded at t=0
    clock.now += 20.0
    assert grace.kept(current, needed=["old"]) == {}  # needed again at t=20
    clock.now += 5.0
    assert grace.kept(current, needed=[]) == {"old": model}  # leaves again at t=25
    clock.now += 25.0
    assert grace.kept(current, needed=[]) == {"old": model}  # t=50: 25 s into the new grace
    clock.now += 5.0
    assert grace.kept(current, needed=[]) == {}  # t=55: 30 s since it left again


def test_any_expired_turns_true_when_a_kept_version_runs_out_of_grace(
    model: RankingModel,
) -> None:
    clock = Clock()
    grace = UnloadGrace(30.0, clock=clock)

    assert not grace.any_expired()
    grace.kept({"old": model}, needed=[])
    clock.now += 29.0
    assert not grace.any_expired()
    clock.now += 1.0
    assert grace.any_expired()


def test_any_expired_is_false_again_once_the_expired_version_was_dropped(
    model: RankingModel,
) -> None:
    clock = Clock()
    grace = UnloadGrace(30.0, clock=clock)
    grace.kept({"old": model}, needed=[])
    clock.now += 31.0
    assert grace.any_expired()

    assert grace.kept({"old": model}, needed=[]) == {}

    assert not grace.any_expired()


def test_a_version_no_longer_in_the_snapshot_is_forgotten(model: RankingModel) -> None:
    clock = Clock()
    grace = UnloadGrace(30.0, clock=clock)
    grace.kept({"old": model}, needed=[])

    grace.kept({}, needed=[])  # "old" left the snapshot
    clock.now += 31.0

    assert not grace.any_expired()


def test_a_zero_second_grace_keeps_nothing(model: RankingModel) -> None:
    grace = UnloadGrace(0.0, clock=Clock())

    assert grace.kept({"old": model, "new": model}, needed=["new"]) == {}


# -- the pod's own compiled-model cache ----------------------------------------------------------


def test_a_read_only_root_compiles_into_the_pods_own_cache(
    artifacts: Path, model_version: str, tmp_path: Path
) -> None:
    root = ArtifactRoot(artifacts)
    shutil.rmtree(root.compiled, ignore_errors=True)
    cache_dir = tmp_path / "cache" / "recsys" / "compiled"
    cache_dir.parent.mkdir(parents=True, mode=0o700)
    fallbacks: list[tuple[str, str]] = []
    artifacts.chmod(0o555)  # as the pods mount it
    try:
        cache = ModelCache(
            root, compiled_cache=cache_dir, on_fallback=lambda n, v: fallbacks.append((n, v))
        )
        model = cache.get(NAME, model_version)
    finally:
        artifacts.chmod(0o755)
    assert model.engine == "lleaves"
    assert model.compiled is not None
    assert model.compiled.binary.is_relative_to(cache_dir / NAME / model_version)
    assert not root.compiled.exists()
    assert fallbacks == []


def test_a_cache_others_can_write_falls_back_to_lightgbm_and_is_reported(
    artifacts: Path, model_version: str, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # an emptyDir's mode: the cache must be a directory below it
    fallbacks: list[tuple[str, str]] = []
    cache = ModelCache(
        ArtifactRoot(artifacts),
        compiled_cache=shared / "compiled",
        on_fallback=lambda n, v: fallbacks.append((n, v)),
    )
    model = cache.get(NAME, model_version)
    assert model.engine == "lightgbm"
    assert fallbacks == [(NAME, model_version)]
