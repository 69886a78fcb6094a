"""Validation: every bad document is rejected with the path of what is wrong."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recsys.experiments.config import ConfigError, default_config, parse_config
from recsys.types import PipelineParams
from tests.experiments.docs import two_layer_doc

Doc = dict[str, Any]


def test_default_config_is_valid_and_matches_pipeline_defaults() -> None:
    config = parse_config(default_config())
    assert config.defaults == PipelineParams()
    assert len(config.layers) >= 2
    everyone = config.layers[0].experiments[0]
    assert everyone.bucket_count == config.num_buckets
    assert sorted(a.params["retrieval_k"] for a in everyone.arms) == [200, 400]
    partial = config.layers[1].experiments[0]
    assert 0 < partial.bucket_count < config.num_buckets


def test_two_layer_doc_is_valid() -> None:
    config = parse_config(two_layer_doc(), known_model_versions={"m1", "m2", "m3"})
    assert [layer.name for layer in config.layers] == ["retrieval", "arrange", "ranking"]


def _set(path: list[Any], value: Any) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        target: Any = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _delete(path: list[Any]) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        target: Any = doc
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


EXP0 = ["layers", 0, "experiments", 0]
EXP3 = ["layers", 2, "experiments", 0]

BAD_DOCUMENTS: list[tuple[str, Callable[[Doc], None], str]] = [
    (
        "zero weight",
        _set([*EXP0, "arms", 1, "weight"], 0),
        "layers[0].experiments[0].arms[1].weight: expected > 0",
    ),
    (
        "negative weight",
        _set([*EXP0, "arms", 0, "weight"], -1),
        "layers[0].experiments[0].arms[0].weight: expected > 0",
    ),
    ("string weight", _set([*EXP0, "arms", 0, "weight"], "50"), "arms[0].weight: expected > 0"),
    (
        "unknown parameter",
        _set([*EXP0, "arms", 0, "params", "retrieval_depth"], 5),
        "layers[0].experiments[0].arms[0].params.retrieval_depth: unknown parameter",
    ),
    (
        "wrong parameter type",
        _set([*EXP0, "arms", 0, "params", "retrieval_k"], "200"),
        "params.retrieval_k: expected an integer",
    ),
    (
        "bool as int",
        _set([*EXP0, "arms", 0, "params", "retrieval_k"], True),
        "params.retrieval_k: expected an integer",
    ),
    (
        "retrieval_k too big",
        _set([*EXP0, "arms", 0, "params", "retrieval_k"], 5000),
        "params.retrieval_k: expected <= 2000",
    ),
    ("nprobe negative", _set(["defaults", "nprobe"], -1), "defaults.nprobe: expected >= 0"),
    (
        "cap zero",
        _set(["layers", 1, "experiments", 0, "arms", 0, "params", "max_per_restaurant"], 0),
        "layers[1].experiments[0].arms[0].params.max_per_restaurant: expected >= 1",
    ),
    ("radius zero", _set(["defaults", "radius_km"], 0), "defaults.radius_km: expected > 0"),
    (
        "unknown model version",
        _set([*EXP3, "arms", 1, "params", "model_version"], "m9"),
        "layers[2].experiments[0].arms[1].params.model_version: unknown model version 'm9'",
    ),
    (
        "bucket overlap",
        _set(["layers", 2, "experiments", 1, "status"], "running"),
        "layers[2].experiments[0].buckets: [0, 5000] overlaps [0, 100] of running experiment "
        "'ranker-draft'",
    ),
    (
        "range past the end",
        _set([*EXP0, "buckets"], [[0, 10001]]),
        "layers[0].experiments[0].buckets[0]: expected 0 <= start < end <= 10000",
    ),
    ("empty range", _set([*EXP0, "buckets"], [[5, 5]]), "buckets[0]: expected 0 <= start < end"),
    (
        "self overlap",
        _set([*EXP0, "buckets"], [[0, 10], [5, 20]]),
        "layers[0].experiments[0].buckets: ranges [0, 10] and [5, 20] overlap",
    ),
    (
        "too few buckets",
        _set(["num_buckets"], 999),
        "num_buckets: expected an integer between 1000",
    ),
    ("unknown top key", _set(["layerz"], []), "layerz: unknown key"),
    (
        "unknown experiment key",
        _set([*EXP0, "traffic"], 50),
        "layers[0].experiments[0].traffic: unknown key",
    ),
    (
        "missing arms",
        _delete([*EXP0, "arms"]),
        "layers[0].experiments[0].arms: required key is missing",
    ),
    (
        "no arms",
        _set([*EXP0, "arms"], []),
        "layers[0].experiments[0].arms: expected at least one arm",
    ),
    (
        "bad status",
        _set([*EXP0, "status"], "paused"),
        "layers[0].experiments[0].status: expected one of",
    ),
    (
        "duplicate experiment",
        _set(["layers", 1, "experiments", 0, "name"], "retrieval-depth"),
        "layers[1].experiments[0].name: duplicate experiment name 'retrieval-depth'",
    ),
    (
        "duplicate layer",
        _set(["layers", 1, "name"], "retrieval"),
        "layers[1].name: duplicate layer name",
    ),
    (
        "reserved layer",
        _set(["layers", 1, "name"], "holdout"),
        "layers[1].name: 'holdout' is reserved",
    ),
    (
        "duplicate arm",
        _set([*EXP0, "arms", 1, "name"], "k200"),
        "layers[0].experiments[0].arms[1].name: duplicate arm name",
    ),
    (
        "bad name",
        _set([*EXP0, "name"], "has space"),
        "layers[0].experiments[0].name: expected a name",
    ),
    (
        "param in two layers",
        _set(["layers", 1, "launch_defaults"], {"retrieval_k": 300}),
        "layers[1].launch_defaults.retrieval_k: parameter 'retrieval_k' is already set in layer "
        "'retrieval'",
    ),
    (
        "empty targeting list",
        _set([*EXP3, "targeting", "platforms"], []),
        "layers[2].experiments[0].targeting.platforms: expected at least one value",
    ),
    (
        "bad has_location",
        _set([*EXP3, "targeting", "has_location"], "yes"),
        "targeting.has_location: expected true or false",
    ),
    (
        "test user unknown experiment",
        _set(["test_users", "qa"], {"nope": "a"}),
        "test_users.qa.nope: unknown experiment",
    ),
    (
        "test user unknown arm",
        _set(["test_users", "qa"], {"retrieval-depth": "k999"}),
        "test_users.qa.retrieval-depth: unknown arm 'k999'",
    ),
    (
        "two forced in one layer",
        _set(["test_users", "qa"], {"ranker-v2": "v2", "ranker-draft": "v3"}),
        "share layer 'ranking'",
    ),
    (
        "holdout overlap",
        _set(["holdout", "buckets"], [[0, 10], [5, 6]]),
        "holdout.buckets: ranges [0, 10] and [5, 6] overlap",
    ),
    ("schema", _set(["schema"], 2), "schema: expected 1"),
    ("kill switch type", _set(["kill_switch"], "no"), "kill_switch: expected true or false"),
    (
        "epoch negative",
        _set([*EXP0, "epoch"], -1),
        "layers[0].experiments[0].epoch: expected an integer >= 0",
    ),
    ("layers not a list", _set(["layers"], {}), "layers: expected a list"),
]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [(m, e) for _, m, e in BAD_DOCUMENTS],
    ids=[n for n, _, _ in BAD_DOCUMENTS],
)
def test_bad_document_is_rejected_with_its_path(
    mutate: Callable[[Doc], None], expected: str
) -> None:
    doc = two_layer_doc()
    mutate(doc)
    with pytest.raises(ConfigError) as info:
        parse_config(doc, known_model_versions={"m1", "m2", "m3"})
    assert expected in str(info.value), str(info.value)


def test_every_problem_is_reported_not_only_the_first() -> None:
    doc = two_layer_doc()
    doc["layers"][0]["experiments"][0]["arms"][0]["weight"] = 0
    doc["layers"][1]["experiments"][0]["status"] = "paused"
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    assert len(info.value.errors) == 2


def test_not_an_object_is_rejected() -> None:
    with pytest.raises(ConfigError, match="expected an object"):
        parse_config([])  # type: ignore[arg-type]


def test_model_versions_are_only_checked_when_known() -> None:
    parse_config(two_layer_doc(), known_model_versions=None)
    with pytest.raises(ConfigError, match="unknown model version 'm1'"):
        parse_config(two_layer_doc(), known_model_versions={"m2", "m3"})


PARAM_NAMES = [f.name for f in dataclasses.fields(PipelineParams)]
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 10_000),
    st.floats(allow_nan=True),
    st.text(max_size=5),
)


def _acceptable(name: str, value: Any) -> bool:
    """What the pipeline can take, written from the brief rather than from the validator."""
    if isinstance(value, bool):
        return False
    if name in ("retrieval_k", "nprobe", "max_per_restaurant", "rank_cut"):
        high = {"retrieval_k": 2000, "nprobe": 4096, "max_per_restaurant": None, "rank_cut": 2000}
        # nprobe 0: the index version's measured default; rank_cut 0: the model scores all
        low = 0 if name in ("nprobe", "rank_cut") else 1
        top = high[name]
        return isinstance(value, int) and value >= low and (top is None or value <= top)
    if name == "radius_km":
        return isinstance(value, int | float) and math.isfinite(value) and 0 < value <= 20_000
    if name == "model_name":
        return isinstance(value, str) and value != ""
    return isinstance(value, str)  # model_version


@given(st.sampled_from(PARAM_NAMES), json_scalars)
def test_a_parameter_value_is_accepted_only_if_the_pipeline_can_take_it(
    name: str, value: Any
) -> None:
    doc = two_layer_doc()
    doc["defaults"][name] = value
    if _acceptable(name, value):
        config = parse_config(doc)
        assert getattr(config.defaults, name) == value
    else:
        with pytest.raises(ConfigError, match=rf"defaults\.{name}:"):
            parse_config(doc)


@given(st.text(min_size=1, max_size=12).filter(lambda k: k not in PARAM_NAMES), st.integers())
def test_unknown_parameters_are_rejected_wherever_they_appear(key: str, value: int) -> None:
    for where in (["defaults"], ["layers", 0, "launch_defaults"], [*EXP0, "arms", 0, "params"]):
        doc = copy.deepcopy(two_layer_doc())
        _set([*where, key], value)(doc)
        with pytest.raises(ConfigError, match="unknown parameter"):
            parse_config(doc)


@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 3000)), min_size=1, max_size=6))
def test_overlapping_running_experiments_are_rejected(ranges: list[tuple[int, int]]) -> None:
    """Two experiments of a layer are accepted exactly when their bucket sets are disjoint."""
    a = [[s, min(s + n, 10_000)] for s, n in ranges[: len(ranges) // 2 + 1] if s < 10_000]
    b = [[s, min(s + n, 10_000)] for s, n in ranges[len(ranges) // 2 + 1 :] if s < 10_000]

    def disjoint_within(rs: list[list[int]]) -> bool:
        sets = [set(range(*r)) for r in rs]
        return sum(map(len, sets)) == len(set().union(*sets))

    doc = two_layer_doc()
    exp = doc["layers"][0]["experiments"][0]
    exp["buckets"] = a
    other = copy.deepcopy(exp)
    other["name"] = "second"
    other["buckets"] = b
    doc["layers"][0]["experiments"].append(other)
    set_a = set().union(*(set(range(*r)) for r in a))
    set_b = set().union(*(set(range(*r)) for r in b))
    valid = disjoint_within(a) and disjoint_within(b) and not (set_a & set_b)
    if valid:
        parse_config(doc)
    else:
        with pytest.raises(ConfigError, match=r"layers\[0\]\.experiments\[[01]\]\.buckets"):
            parse_config(doc)
