"""Assignment against a slow reference written from the rules, plus the rules one by one."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.experiments import hashing
from recsys.experiments.assignment import (
    HOLDOUT_ARM,
    HOLDOUT_EXPERIMENT,
    RequestAttributes,
    _slot_twin,
    compile_config,
)
from recsys.experiments.config import ExperimentConfig, parse_config
from recsys.types import Assignment, Exposure, PipelineParams
from tests.experiments.docs import two_layer_doc

SURFACES = ["home", "search", "offers"]
PLATFORMS = ["ios", "android", "web"]
LAYER_PARAMS: list[tuple[str, st.SearchStrategy[Any]]] = [
    ("retrieval_k", st.integers(1, 2000)),
    ("nprobe", st.integers(1, 4096)),
    ("max_per_restaurant", st.integers(1, 10)),
    ("radius_km", st.floats(0.5, 50)),
    ("model_version", st.sampled_from(["", "m1", "m2"])),
]


def reference_assign(
    config: ExperimentConfig, user_id: str, attrs: RequestAttributes
) -> tuple[tuple[Exposure, ...], PipelineParams]:
    """The rules of docs/experiments.md, one layer and one experiment at a time."""
    defaults = dataclasses.asdict(config.defaults)
    launched = dict(defaults)
    for layer in config.layers:
        launched.update(layer.launch_defaults)
    if config.kill_switch:
        return (), PipelineParams(**launched)
    hb = hashing.bucket(user_id, hashing.holdout_key(config.holdout.salt), config.num_buckets)
    in_holdout = any(s <= hb < e for s, e in config.holdout.buckets)
    values = dict(defaults if in_holdout else launched)
    forced: dict[str, tuple[str, str]] = {}
    for exp_name, arm_name in config.test_users.get(user_id, {}).items():
        found = config.find(exp_name)
        assert found is not None
        if found[1].status != "killed":
            forced[found[1].layer] = (exp_name, arm_name)
    exposures: list[Exposure] = []
    for layer in config.layers:
        b = hashing.bucket(user_id, hashing.layer_key(layer.salt), layer.num_buckets)
        if layer.name in forced:
            exp_name, arm_name = forced[layer.name]
            found = config.find(exp_name)
            assert found is not None
            arm = found[1].arm(arm_name)
            assert arm is not None
            exposures.append(Exposure(layer.name, exp_name, arm_name, b, True))
            values.update(layer.launch_defaults)
            values.update(arm.params)
            continue
        if in_holdout:
            continue
        for exp in layer.experiments:
            t = exp.targeting
            if not exp.running or not any(s <= b < e for s, e in exp.buckets):
                continue
            if not t.matches(attrs.surface, attrs.platform, attrs.has_location):
                continue
            point = hashing.arm_point(user_id, hashing.experiment_key(exp.salt, exp.epoch))
            k = hashing.arm_index(point, hashing.arm_thresholds([a.weight for a in exp.arms]))
            exposures.append(Exposure(layer.name, exp.name, exp.arms[k].name, b, False))
            values.update(exp.arms[k].params)
    if in_holdout:
        exposures.append(Exposure("holdout", HOLDOUT_EXPERIMENT, HOLDOUT_ARM, hb, False))
    return tuple(exposures), PipelineParams(**values)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    num_buckets = draw(st.sampled_from([1000, 2000, 10_000]))
    layers: list[dict[str, Any]] = []
    for i in range(draw(st.integers(1, len(LAYER_PARAMS)))):
        param, values = LAYER_PARAMS[i]
        cuts = sorted(set(draw(st.lists(st.integers(0, num_buckets), max_size=8))) | {0})
        segments = list(zip(cuts, [*cuts[1:], num_buckets], strict=True))
        experiments = []
        for j, (start, end) in enumerate(segments):
            if start == end or draw(st.booleans()) is False:
                continue  # free buckets
            n_arms = draw(st.integers(1, 3))
            exp: dict[str, Any] = {
                "name": f"e{i}-{j}",
                "status": draw(st.sampled_from(["running", "running", "stopped", "killed"])),
                "epoch": draw(st.integers(0, 3)),
                "buckets": [[start, end]],
                "arms": [
                    {
                        "name": f"a{k}",
                        "weight": draw(st.floats(0.1, 10)),
                        "params": {param: draw(values)} if draw(st.booleans()) else {},
                    }
                    for k in range(n_arms)
                ],
            }
            if draw(st.booleans()):
                targeting: dict[str, Any] = {}
                if draw(st.booleans()):
                    targeting["surfaces"] = draw(st.lists(st.sampled_from(SURFACES), min_size=1))
                if draw(st.booleans()):
                    targeting["platforms"] = draw(st.lists(st.sampled_from(PLATFORMS), min_size=1))
                if draw(st.booleans()):
                    targeting["has_location"] = draw(st.booleans())
                exp["targeting"] = targeting
            experiments.append(exp)
        launch = {param: draw(values)} if draw(st.booleans()) else {}
        layers.append(
            {"name": f"l{i}", "salt": draw(st.text(min_size=1, max_size=6)),
             "launch_defaults": launch, "experiments": experiments}
        )  # fmt: skip
    hold = draw(st.integers(0, num_buckets // 4))
    doc: dict[str, Any] = {
        "schema": 1,
        "num_buckets": num_buckets,
        "kill_switch": draw(st.booleans()) and draw(st.booleans()),
        "holdout": {"salt": "h", "buckets": [[0, hold]] if hold else []},
        "layers": layers,
    }
    exps: list[tuple[str, list[dict[str, Any]]]] = [
        (e["name"], e["arms"]) for layer in layers for e in layer["experiments"]
    ]
    if len(exps) > 0 and draw(st.booleans()):
        name, arms = draw(st.sampled_from(exps))
        doc["test_users"] = {"user-0": {name: draw(st.sampled_from(arms))["name"]}}
    return doc


attributes = st.builds(
    RequestAttributes, st.sampled_from([*SURFACES, "other"]),
    st.sampled_from([*PLATFORMS, ""]), st.booleans(),
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(
    documents(),
    st.lists(st.integers(0, 10**6), min_size=1, max_size=20),
    attributes,
    st.lists(attributes, min_size=21, max_size=21),
)
def test_assigner_agrees_with_the_reference(
    doc: dict[str, Any], users: list[int], attrs: RequestAttributes, mixed: list[RequestAttributes]
) -> None:
    config = parse_config(doc)
    assigner = compile_config(doc, version="7")
    user_ids = ["user-0", *(f"user-{u}" for u in users)]
    for user_id in user_ids:
        got = assigner.assign(user_id, attrs)
        assert (got.exposures, got.params) == reference_assign(config, user_id, attrs)
        assert got.config_version == "7"
        layers = [e.layer for e in got.exposures]
        assert len(layers) == len(set(layers)), "experiments in a layer must be exclusive"
        assert assigner.assign(user_id, attrs) == got  # deterministic
    many = assigner.assign_many(user_ids, [attrs] * len(user_ids))
    assert many == [assigner.assign(u, attrs) for u in user_ids]
    # A batch of requests from different surfaces and platforms (how the batched stage calls it).
    each = mixed[: len(user_ids)]
    assert assigner.assign_many(user_ids, each) == [
        assigner.assign(u, a) for u, a in zip(user_ids, each, strict=True)
    ]


def test_assignment_serves_arm_parameters_over_launch_defaults_over_defaults() -> None:
    assigner = compile_config(two_layer_doc(), version="3")
    attrs = RequestAttributes(surface="home", platform="ios", has_location=True)
    seen: Counter[tuple[str, ...]] = Counter()
    for i in range(3000):
        a = assigner.assign(f"user-{i}", attrs)
        arms = {e.experiment: e.arm for e in a.exposures}
        if "holdout" in {e.layer for e in a.exposures}:
            assert a.params == PipelineParams()  # the holdout gets the defaults only
            continue
        assert a.params.nprobe == 32  # a launch default of the retrieval layer
        assert a.params.retrieval_k == {"k200": 200, "k400": 400}[arms["retrieval-depth"]]
        assert (
            a.params.max_per_restaurant
            == {None: 2, "cap-2": 2, "cap-3": 3}[arms.get("restaurant-cap")]
        )
        assert (
            a.params.model_version
            == {None: "m1", "control": "m1", "v2": "m2"}[arms.get("ranker-v2")]
        )
        seen[tuple(sorted(arms.values()))] += 1
    assert len(seen) == 2 * 3 * 3  # every combination (with "not in it") across the layers


def test_holdout_share_and_exposure() -> None:
    assigner = compile_config(two_layer_doc())
    n = 20_000
    held = [
        a for i in range(n) for a in (assigner.assign(f"u{i}", RequestAttributes()),)
        if any(e.layer == "holdout" for e in a.exposures)
    ]  # fmt: skip
    assert 0.09 < len(held) / n < 0.11  # 1,000 of 10,000 buckets
    for a in held:
        assert [(e.experiment, e.arm) for e in a.exposures] == [(HOLDOUT_EXPERIMENT, HOLDOUT_ARM)]


def test_targeting_on_surface_platform_and_location() -> None:
    assigner = compile_config(two_layer_doc())

    def experiments(attrs: RequestAttributes) -> set[str]:
        return {
            e.experiment for i in range(2000) for e in assigner.assign(f"u{i}", attrs).exposures
        }

    assert "ranker-v2" in experiments(RequestAttributes("home", "ios", True))
    assert "ranker-v2" not in experiments(RequestAttributes("home", "android", True))
    assert "ranker-v2" not in experiments(RequestAttributes("home", "ios", False))
    assert "restaurant-cap" in experiments(RequestAttributes("home", "web", False))
    assert "restaurant-cap" not in experiments(RequestAttributes("search", "web", False))


def test_kill_switch_serves_defaults_at_once() -> None:
    doc = two_layer_doc()
    doc["kill_switch"] = True
    assigner = compile_config(doc)
    for user_id in ["qa-tester", *(f"u{i}" for i in range(200))]:
        a = assigner.assign(user_id, RequestAttributes("home", "ios", True))
        assert a.exposures == ()
        assert a.params == dataclasses.replace(PipelineParams(), nprobe=32, model_version="m1")
    assert all(la.experiment == "" for la in assigner.assign_all_layers("u1", RequestAttributes()))


def test_qa_override_forces_an_arm_and_says_so() -> None:
    doc = two_layer_doc()
    doc["test_users"] = {"qa-alice": {"restaurant-cap": "cap-3", "ranker-draft": "v3"}}
    assigner = compile_config(doc)
    a = assigner.assign("qa-alice", RequestAttributes(surface="search"))  # not targeted, yet forced
    forced = {e.experiment: (e.arm, e.forced) for e in a.exposures}
    assert forced["restaurant-cap"] == ("cap-3", True)
    assert forced["ranker-draft"] == ("v3", True)  # a stopped experiment may be forced for QA
    assert forced["retrieval-depth"][1] is False
    assert a.params.max_per_restaurant == 3
    assert a.params.model_version == "m3"
    doc["layers"][2]["experiments"][1]["status"] = "killed"
    killed = compile_config(doc).assign("qa-alice", RequestAttributes())
    assert "ranker-draft" not in {e.experiment for e in killed.exposures}


def test_assign_all_layers_lists_every_layer() -> None:
    assigner = compile_config(two_layer_doc())
    attrs = RequestAttributes("search", "web", False)
    rows = assigner.assign_all_layers("user-42", attrs)
    assert [r.layer for r in rows] == ["retrieval", "arrange", "ranking"]
    served = {e.layer: e for e in assigner.assign("user-42", attrs).exposures}
    for r in rows:
        assert 0 <= r.bucket < 10_000
        if r.layer in served:
            assert (r.experiment, r.arm, r.bucket) == (
                served[r.layer].experiment, served[r.layer].arm, served[r.layer].bucket,
            )  # fmt: skip
        else:
            assert (r.experiment, r.arm) == ("", "")


def test_exposure_label_sets_are_the_configured_arms() -> None:
    assigner = compile_config(two_layer_doc())
    labels = assigner.exposure_label_sets()
    assert ("retrieval", "retrieval-depth", "k400") in labels
    assert ("holdout", HOLDOUT_EXPERIMENT, HOLDOUT_ARM) in labels
    assert len(labels) == len(set(labels)) == 2 + 2 + 2 + 1 + 1
    for i in range(500):
        for e in assigner.assign(f"u{i}", RequestAttributes("home", "ios", True)).exposures:
            assert (e.layer, e.experiment, e.arm) in labels


def test_assign_many_checks_its_arguments() -> None:
    assigner = compile_config(two_layer_doc())
    with pytest.raises(ValueError, match="2 user ids but 1 attributes"):
        assigner.assign_many(["a", "b"], [RequestAttributes()])
    assert assigner.assign_many([], []) == []


def test_fast_built_objects_are_the_real_types_and_equal_to_the_slow_path() -> None:
    doc = two_layer_doc()
    assigner = compile_config(doc, version="5")
    slow = compile_config(doc, version="5")
    slow._exposure_slots = None  # what happens when the dataclass stops being a plain one
    slow._assignment_slots = None
    attrs = RequestAttributes("home", "ios", True)
    for i in range(300):
        fast = assigner.assign(f"u{i}", attrs)
        assert type(fast) is Assignment
        assert all(type(e) is Exposure for e in fast.exposures)
        assert fast == slow.assign(f"u{i}", attrs)
        assert hash(fast.exposures) == hash(slow.assign(f"u{i}", attrs).exposures)
        with pytest.raises(dataclasses.FrozenInstanceError):
            fast.exposures[0].arm = "other"  # type: ignore[misc]


def test_slot_twin_only_for_plain_frozen_slots_dataclasses() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Plain:
        a: int
        b: str

    @dataclasses.dataclass(frozen=True, slots=True)
    class Checked:
        a: int

        def __post_init__(self) -> None:
            assert self.a > 0

    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        a: int

    twin = _slot_twin(Plain(1, "x"))
    assert twin is not None
    built = twin()
    built.a, built.b = 2, "y"
    built.__class__ = Plain
    assert built == Plain(2, "y")
    assert _slot_twin(Checked(1)) is None
    assert _slot_twin(NoSlots(1)) is None


def test_parameters_keep_the_type_each_arm_gave() -> None:
    doc = two_layer_doc()
    doc["defaults"]["radius_km"] = 8
    assigner = compile_config(doc)
    for i in range(200):
        params = assigner.assign(f"u{i}", RequestAttributes()).params
        assert type(params.radius_km) is float
        assert type(params.retrieval_k) is int
