"""The experiments document: its schema, validation and typed form.

A document is plain JSON (see docs/experiments.md for an annotated example)::

    {"schema": 1, "num_buckets": 10000, "kill_switch": false,
     "defaults": {<PipelineParams fields>},
     "holdout": {"salt": "global-holdout", "buckets": [[0, 100]]},
     "test_users": {"<user id>": {"<experiment>": "<arm>"}},
     "layers": [{"name", "salt", "num_buckets"?, "launch_defaults": {...},
                 "experiments": [{"name", "salt"?, "epoch", "status", "buckets": [[start, end]],
                                  "targeting"?: {"surfaces", "platforms", "has_location"},
                                  "arms": [{"name", "weight", "params": {...}}]}]}]}

:func:`parse_config` checks everything a server relies on and raises :class:`ConfigError`
naming each wrong value by its path, e.g. ``layers[1].experiments[3].arms[0].weight: expected > 0``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from recsys.types import PipelineParams

SCHEMA_VERSION = 1
DEFAULT_NUM_BUCKETS = 10_000
MIN_NUM_BUCKETS = 1_000
MAX_NUM_BUCKETS = 1_000_000
STATUSES = ("running", "stopped", "killed")
HOLDOUT_LAYER = "holdout"
"""Exposures of users in the global holdout carry this layer name (reserved)."""

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_ERRORS = 20


def _param_types() -> dict[str, type]:
    hints = typing.get_type_hints(PipelineParams)
    return {f.name: hints[f.name] for f in dataclasses.fields(PipelineParams)}


# name -> (low, high) inclusive for numbers; None means unbounded on that side.
PARAM_RANGES: dict[str, tuple[float | None, float | None]] = {
    "retrieval_k": (1, 2000),
    "nprobe": (0, 4096),  # 0: the index version's measured default
    "max_per_restaurant": (1, None),
    "radius_km": (0.0, 20_000.0),  # exclusive low: a radius must be > 0
    "rank_cut": (0, 2000),  # 0: the full model scores every candidate
}
EXCLUSIVE_LOW = frozenset({"radius_km"})


class ConfigError(ValueError):
    """An experiments document that must not serve; ``errors`` holds one line per problem."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = tuple(errors)
        shown = "; ".join(self.errors[:MAX_ERRORS])
        more = len(self.errors) - MAX_ERRORS
        super().__init__(shown + (f"; and {more} more" if more > 0 else ""))


@dataclass(frozen=True)
class Targeting:
    """Who an experiment applies to; ``None`` means any value."""

    surfaces: frozenset[str] | None = None
    platforms: frozenset[str] | None = None
    has_location: bool | None = None

    @property
    def is_everyone(self) -> bool:
        return self.surfaces is None and self.platforms is None and self.has_location is None

    def matches(self, surface: str, platform: str, has_location: bool) -> bool:
        return (
            (self.surfaces is None or surface in self.surfaces)
            and (self.platforms is None or platform in self.platforms)
            and (self.has_location is None or has_location == self.has_location)
        )


@dataclass(frozen=True)
class Arm:
    name: str
    weight: float
    params: Mapping[str, Any]


@dataclass(frozen=True)
class Experiment:
    name: str
    layer: str
    salt: str
    epoch: int
    status: str
    buckets: tuple[tuple[int, int], ...]
    """Half-open ranges [start, end) of the layer's buckets."""
    arms: tuple[Arm, ...]
    targeting: Targeting

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def bucket_count(self) -> int:
        return sum(end - start for start, end in self.buckets)

    def arm(self, name: str) -> Arm | None:
        return next((a for a in self.arms if a.name == name), None)


@dataclass(frozen=True)
class Layer:
    name: str
    salt: str
    num_buckets: int
    launch_defaults: Mapping[str, Any]
    experiments: tuple[Experiment, ...]


@dataclass(frozen=True)
class Holdout:
    salt: str
    buckets: tuple[tuple[int, int], ...]

    @property
    def bucket_count(self) -> int:
        return sum(end - start for start, end in self.buckets)


@dataclass(frozen=True)
class ExperimentConfig:
    num_buckets: int
    defaults: PipelineParams
    kill_switch: bool
    holdout: Holdout
    layers: tuple[Layer, ...]
    test_users: Mapping[str, Mapping[str, str]]
    """QA overrides: user id -> experiment name -> forced arm name."""

    def find(self, experiment: str) -> tuple[int, Experiment] | None:
        """The layer index and experiment named ``experiment``, if any."""
        for i, layer in enumerate(self.layers):
            for exp in layer.experiments:
                if exp.name == experiment:
                    return i, exp
        return None


class _Checker:
    """Collects every problem with its path instead of stopping at the first."""

    def __init__(self, known_model_versions: Collection[str] | None) -> None:
        self.errors: list[str] = []
        self.known_model_versions = known_model_versions
        self.param_types = _param_types()

    def fail(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    def mapping(
        self, value: Any, path: str, required: tuple[str, ...], optional: tuple[str, ...]
    ) -> Mapping[str, Any] | None:
        if not isinstance(value, dict):
            self.fail(path, f"expected an object, got {_describe(value)}")
            return None
        for key in required:
            if key not in value:
                self.fail(_join(path, key), "required key is missing")
        if not value.keys() <= _allowed_keys(required, optional):
            allowed = _allowed_keys(required, optional)
            for key in value:
                if key not in allowed:
                    expected = sorted(allowed)
                    self.fail(_join(path, str(key)), f"unknown key; expected one of {expected}")
        return value

    def list_of(self, value: Any, path: str) -> Sequence[Any]:
        if not isinstance(value, list):
            self.fail(path, f"expected a list, got {_describe(value)}")
            return []
        return value

    def name(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
            self.fail(path, f"expected a name matching {NAME_PATTERN.pattern}, got {value!r}")
            return "" if not isinstance(value, str) else value
        return value

    def string(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(path, f"expected a non-empty string, got {value!r}")
            return ""
        return value

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            self.fail(path, f"expected true or false, got {value!r}")
            return False
        return value

    def integer(self, value: Any, path: str, low: int, high: int | None = None) -> int:
        if not _is_int(value) or value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            self.fail(path, f"expected an integer {bound}, got {value!r}")
            return low
        return int(value)

    def params(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(path, f"expected an object of parameters, got {_describe(value)}")
            return {}
        checked: dict[str, Any] = {}
        for key, v in value.items():
            p = _join(path, str(key))
            expected = self.param_types.get(key)
            if expected is None:
                self.fail(p, f"unknown parameter; expected one of {sorted(self.param_types)}")
                continue
            if self.param_value(key, v, expected, p):
                checked[key] = float(v) if expected is float else v
        return checked

    def param_value(self, key: str, v: Any, expected: type, path: str) -> bool:
        if expected is int and not _is_int(v):
            self.fail(path, f"expected an integer, got {v!r}")
            return False
        if expected is float and not (_is_number(v) and math.isfinite(v)):
            self.fail(path, f"expected a finite number, got {v!r}")
            return False
        if expected is str and not isinstance(v, str):
            self.fail(path, f"expected a string, got {v!r}")
            return False
        low, high = PARAM_RANGES.get(key, (None, None))
        if low is not None and (v <= low if key in EXCLUSIVE_LOW else v < low):
            self.fail(path, f"expected {'>' if key in EXCLUSIVE_LOW else '>='} {low}, got {v!r}")
            return False
        if high is not None and v > high:
            self.fail(path, f"expected <= {high}, got {v!r}")
            return False
        if key == "model_name" and not v:
            self.fail(path, "expected a non-empty model name")
            return False
        if (
            key == "model_version"
            and v
            and self.known_model_versions is not None
            and v not in self.known_model_versions
        ):
            known = sorted(self.known_model_versions)
            self.fail(path, f"unknown model version {v!r}; published versions: {known}")
            return False
        return True

    def ranges(self, value: Any, path: str, num_buckets: int) -> tuple[tuple[int, int], ...]:
        found: list[tuple[int, int]] = []
        for i, r in enumerate(self.list_of(value, path)):
            p = f"{path}[{i}]"
            if not (isinstance(r, list) and len(r) == 2 and _is_int(r[0]) and _is_int(r[1])):
                self.fail(p, f"expected [start, end] (two integers), got {r!r}")
                continue
            start, end = int(r[0]), int(r[1])
            if not 0 <= start < end <= num_buckets:
                self.fail(p, f"expected 0 <= start < end <= {num_buckets}, got [{start}, {end}]")
                continue
            found.append((start, end))
        ordered = sorted(found)
        reach: tuple[int, int] | None = None  # the range reaching furthest so far
        for start, end in ordered:
            if reach is not None and start < reach[1]:
                self.fail(path, f"ranges {list(reach)} and [{start}, {end}] overlap")
            if reach is None or end > reach[1]:
                reach = (start, end)
        return tuple(ordered)


@functools.cache
def _allowed_keys(required: tuple[str, ...], optional: tuple[str, ...]) -> frozenset[str]:
    return frozenset(required) | frozenset(optional)


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def parse_config(
    doc: Mapping[str, Any], *, known_model_versions: Collection[str] | None = None
) -> ExperimentConfig:
    """Validate ``doc`` and return its typed form, or raise :class:`ConfigError`.

    ``known_model_versions``: when given, a ``model_version`` parameter must be one of them.
    """
    c = _Checker(known_model_versions)
    top = c.mapping(
        doc,
        "",
        ("schema", "layers"),
        ("num_buckets", "defaults", "holdout", "kill_switch", "test_users", "description"),
    )
    if top is None:
        raise ConfigError(c.errors)
    if top.get("schema") != SCHEMA_VERSION:
        c.fail("schema", f"expected {SCHEMA_VERSION}, got {top.get('schema')!r}")
    num_buckets = c.integer(
        top.get("num_buckets", DEFAULT_NUM_BUCKETS), "num_buckets", MIN_NUM_BUCKETS, MAX_NUM_BUCKETS
    )
    defaults = PipelineParams(**c.params(top.get("defaults", {}), "defaults"))
    kill_switch = c.boolean(top.get("kill_switch", False), "kill_switch")
    holdout = _parse_holdout(c, top.get("holdout"), num_buckets)
    layers = _parse_layers(c, top.get("layers"), num_buckets)
    _check_param_ownership(c, layers)
    test_users = _parse_test_users(c, top.get("test_users", {}), layers)
    if c.errors:
        raise ConfigError(c.errors)
    return ExperimentConfig(
        num_buckets=num_buckets,
        defaults=defaults,
        kill_switch=kill_switch,
        holdout=holdout,
        layers=layers,
        test_users=test_users,
    )


def _parse_holdout(c: _Checker, value: Any, num_buckets: int) -> Holdout:
    if value is None:
        return Holdout(salt=HOLDOUT_LAYER, buckets=())
    body = c.mapping(value, "holdout", ("buckets",), ("salt",))
    if body is None:
        return Holdout(salt=HOLDOUT_LAYER, buckets=())
    salt = c.string(body.get("salt", HOLDOUT_LAYER), "holdout.salt")
    return Holdout(salt=salt, buckets=c.ranges(body.get("buckets"), "holdout.buckets", num_buckets))


def _parse_layers(c: _Checker, value: Any, num_buckets: int) -> tuple[Layer, ...]:
    layers: list[Layer] = []
    layer_names: dict[str, str] = {}
    experiment_names: dict[str, str] = {}
    for i, raw in enumerate(c.list_of(value, "layers")):
        path = f"layers[{i}]"
        body = c.mapping(
            raw, path, ("name", "experiments"), ("salt", "num_buckets", "launch_defaults")
        )
        if body is None:
            continue
        name = c.name(body.get("name"), f"{path}.name")
        if name == HOLDOUT_LAYER:
            c.fail(f"{path}.name", f"{HOLDOUT_LAYER!r} is reserved for the global holdout")
        elif name in layer_names:
            c.fail(f"{path}.name", f"duplicate layer name {name!r} (also {layer_names[name]})")
        layer_names.setdefault(name, path)
        salt = c.string(body.get("salt", name), f"{path}.salt")
        nb = c.integer(
            body.get("num_buckets", num_buckets),
            f"{path}.num_buckets",
            MIN_NUM_BUCKETS,
            MAX_NUM_BUCKETS,
        )
        launch = c.params(body.get("launch_defaults", {}), f"{path}.launch_defaults")
        experiments: list[Experiment] = []
        for j, raw_exp in enumerate(c.list_of(body.get("experiments"), f"{path}.experiments")):
            exp = _parse_experiment(c, raw_exp, f"{path}.experiments[{j}]", name, nb)
            if exp is None:
                continue
            if exp.name in experiment_names:
                c.fail(
                    f"{path}.experiments[{j}].name",
                    f"duplicate experiment name {exp.name!r} (also {experiment_names[exp.name]})",
                )
            experiment_names.setdefault(exp.name, f"{path}.experiments[{j}]")
            experiments.append(exp)
        _check_overlaps(c, path, experiments)
        layers.append(Layer(name, salt, nb, launch, tuple(experiments)))
    return tuple(layers)


def _parse_experiment(
    c: _Checker, raw: Any, path: str, layer: str, num_buckets: int
) -> Experiment | None:
    body = c.mapping(
        raw,
        path,
        ("name", "status", "buckets", "arms"),
        ("salt", "epoch", "targeting", "description", "owner"),
    )
    if body is None:
        return None
    name = c.name(body.get("name"), f"{path}.name")
    status = body.get("status")
    if status not in STATUSES:
        c.fail(f"{path}.status", f"expected one of {list(STATUSES)}, got {status!r}")
    arms: list[Arm] = []
    arm_names: set[str] = set()
    raw_arms = c.list_of(body.get("arms"), f"{path}.arms")
    if isinstance(body.get("arms"), list) and not raw_arms:
        c.fail(f"{path}.arms", "expected at least one arm")
    for k, raw_arm in enumerate(raw_arms):
        ap = f"{path}.arms[{k}]"
        arm_body = c.mapping(raw_arm, ap, ("name", "weight"), ("params",))
        if arm_body is None:
            continue
        arm_name = c.name(arm_body.get("name"), f"{ap}.name")
        if arm_name in arm_names:
            c.fail(f"{ap}.name", f"duplicate arm name {arm_name!r}")
        arm_names.add(arm_name)
        weight: Any = arm_body.get("weight")
        if not (_is_number(weight) and math.isfinite(weight) and weight > 0):
            c.fail(f"{ap}.weight", f"expected > 0, got {weight!r}")
            weight = 1.0
        params = c.params(arm_body.get("params", {}), f"{ap}.params")
        arms.append(Arm(arm_name, float(weight), params))
    return Experiment(
        name=name,
        layer=layer,
        salt=c.string(body.get("salt", name), f"{path}.salt"),
        epoch=c.integer(body.get("epoch", 0), f"{path}.epoch", 0),
        status=str(status),
        buckets=c.ranges(body.get("buckets"), f"{path}.buckets", num_buckets),
        arms=tuple(arms),
        targeting=_parse_targeting(c, body.get("targeting"), f"{path}.targeting"),
    )


def _parse_targeting(c: _Checker, value: Any, path: str) -> Targeting:
    if value is None:
        return Targeting()
    body = c.mapping(value, path, (), ("surfaces", "platforms", "has_location"))
    if body is None:
        return Targeting()

    def values(key: str) -> frozenset[str] | None:
        if key not in body:
            return None
        items = c.list_of(body[key], f"{path}.{key}")
        if isinstance(body[key], list) and not items:
            c.fail(f"{path}.{key}", "expected at least one value (omit the key to match any)")
        for i, item in enumerate(items):
            if not isinstance(item, str):
                c.fail(f"{path}.{key}[{i}]", f"expected a string, got {item!r}")
        return frozenset(x for x in items if isinstance(x, str))

    has_location = body.get("has_location")
    if has_location is not None:
        has_location = c.boolean(has_location, f"{path}.has_location")
    return Targeting(values("surfaces"), values("platforms"), has_location)


def _check_overlaps(c: _Checker, layer_path: str, experiments: Sequence[Experiment]) -> None:
    """Running experiments in one layer must own disjoint buckets (they are mutually exclusive)."""
    owned = sorted(
        (start, end, j, exp.name)
        for j, exp in enumerate(experiments)
        if exp.running
        for start, end in exp.buckets
    )
    reach: tuple[int, int, str] | None = None  # the range reaching furthest so far, and its owner
    for start, end, j, name in owned:
        if reach is not None and start < reach[1] and name != reach[2]:
            c.fail(
                f"{layer_path}.experiments[{j}].buckets",
                f"[{start}, {end}] overlaps [{reach[0]}, {reach[1]}] of running experiment "
                f"{reach[2]!r}",
            )
        if reach is None or end > reach[1]:
            reach = (start, end, name)


def _check_param_ownership(c: _Checker, layers: Sequence[Layer]) -> None:
    """A parameter is set in one layer only, so layers stay independent of each other."""
    owner: dict[str, str] = {}
    for i, layer in enumerate(layers):
        used = {key: f"layers[{i}].launch_defaults.{key}" for key in layer.launch_defaults}
        for j, exp in enumerate(layer.experiments):
            for k, arm in enumerate(exp.arms):
                for key in arm.params:
                    used.setdefault(key, f"layers[{i}].experiments[{j}].arms[{k}].params.{key}")
        for key, path in used.items():
            if key in owner and owner[key] != layer.name:
                c.fail(
                    path,
                    f"parameter {key!r} is already set in layer {owner[key]!r}; "
                    "a parameter may be set in one layer only",
                )
            owner.setdefault(key, layer.name)


def _parse_test_users(
    c: _Checker, value: Any, layers: Sequence[Layer]
) -> dict[str, dict[str, str]]:
    experiments = {exp.name: (layer.name, exp) for layer in layers for exp in layer.experiments}
    result: dict[str, dict[str, str]] = {}
    if not isinstance(value, dict):
        c.fail("test_users", f"expected an object {{user id: {{experiment: arm}}}}, got {value!r}")
        return result
    for user_id, forced in value.items():
        path = f"test_users.{user_id}"
        if not isinstance(forced, dict):
            c.fail(path, f"expected an object {{experiment: arm}}, got {_describe(forced)}")
            continue
        layers_forced: dict[str, str] = {}
        for exp_name, arm_name in forced.items():
            p = f"{path}.{exp_name}"
            found = experiments.get(exp_name)
            if found is None:
                c.fail(p, f"unknown experiment; expected one of {sorted(experiments)[:20]}")
                continue
            layer_name, exp = found
            if not isinstance(arm_name, str) or exp.arm(arm_name) is None:
                c.fail(p, f"unknown arm {arm_name!r}; expected one of {[a.name for a in exp.arms]}")
                continue
            if layer_name in layers_forced:
                c.fail(
                    p,
                    f"experiments {layers_forced[layer_name]!r} and {exp_name!r} share layer "
                    f"{layer_name!r}; a user can be forced into one of them only",
                )
                continue
            layers_forced[layer_name] = exp_name
        result[str(user_id)] = {str(k): str(v) for k, v in forced.items()}
    return result


def default_config() -> dict[str, Any]:
    """The document `recsys build` writes first: two layers, defaults = PipelineParams()."""
    return {
        "schema": SCHEMA_VERSION,
        "num_buckets": DEFAULT_NUM_BUCKETS,
        "kill_switch": False,
        "defaults": dataclasses.asdict(PipelineParams()),
        "holdout": {"salt": "global-holdout", "buckets": []},
        "test_users": {"qa-tester": {"restaurant-cap": "cap-3"}},
        "layers": [
            {
                "name": "retrieval",
                "salt": "retrieval",
                "launch_defaults": {},
                "experiments": [
                    {
                        "name": "retrieval-depth",
                        "status": "running",
                        "epoch": 0,
                        "buckets": [[0, DEFAULT_NUM_BUCKETS]],
                        "arms": [
                            {"name": "k200", "weight": 50, "params": {"retrieval_k": 200}},
                            {"name": "k400", "weight": 50, "params": {"retrieval_k": 400}},
                        ],
                    }
                ],
            },
            {
                "name": "arrange",
                "salt": "arrange",
                "launch_defaults": {},
                "experiments": [
                    {
                        "name": "restaurant-cap",
                        "status": "running",
                        "epoch": 0,
                        "buckets": [[0, DEFAULT_NUM_BUCKETS * 3 // 10]],
                        "targeting": {"surfaces": ["home"]},
                        "arms": [
                            {"name": "cap-2", "weight": 50, "params": {"max_per_restaurant": 2}},
                            {"name": "cap-3", "weight": 50, "params": {"max_per_restaurant": 3}},
                        ],
                    }
                ],
            },
        ],
    }
