"""Assignment: hash a user into every layer, find the experiment and arm, merge the parameters.

:func:`compile_config` turns a validated document into an :class:`Assigner`, an immutable
snapshot the server swaps by reference. All lookups are precomputed into flat numpy arrays, so
:meth:`Assigner.assign` costs a fixed number of numpy operations over the layers, whatever the
number of experiments (no per-experiment work on the request path):

1. bucket per layer: ``mix64(user_key ^ layer_key) % num_buckets`` for every layer at once (the
   global holdout is one more row of the same arrays);
2. owner per layer: one ``take`` from the concatenated bucket -> experiment tables, then, when any
   experiment is targeted, one ``take`` from the table of the request's attribute class, which
   maps experiments the request does not match to "none";
3. arm per layer: ``mix64(user_key ^ experiment_key)``, its top 32 bits prefixed by the
   experiment's index, located in the concatenated arm thresholds by one ``searchsorted``.

Every layer has a "none" pseudo-experiment with one arm, so each layer always ends on a global
arm index. Then, in Python, the only per-layer work:

4. labels: one ``take`` from a per-arm table gives each row's (layer, experiment, arm), or None
   for the "none" arms; an :class:`~recsys.types.Exposure` is built for each label by plain
   slot stores on a twin class and a class swap (:func:`_slot_twin`: a third of the cost of the
   frozen dataclass's ``__init__``, which matters at 100 exposures per request);
5. parameters: each parameter's value is read from its table by the arm of the layer that owns
   it (a parameter belongs to one layer, see config.py); the :class:`PipelineParams` for that
   combination of values is built once and reused.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from recsys.experiments import hashing
from recsys.experiments.config import (
    HOLDOUT_LAYER,
    ConfigError,
    Experiment,
    ExperimentConfig,
    default_config,
    parse_config,
)
from recsys.types import DEFAULT_SURFACE, Assignment, Exposure, PipelineParams

__all__ = [
    "HOLDOUT_ARM",
    "HOLDOUT_EXPERIMENT",
    "Assigner",
    "ConfigError",
    "LayerAssignment",
    "RequestAttributes",
    "compile_config",
    "default_config",
]

HOLDOUT_EXPERIMENT = "global-holdout"
HOLDOUT_ARM = "holdout"
_NO_EXPERIMENT = ""
_POINT_SHIFT = hashing.uint64_constant(64 - hashing.POINT_BITS)
_MAX_PARAM_COMBINATIONS = 4096
"""Distinct parameter sets an Assigner keeps built (beyond it, built per request)."""


@dataclass(frozen=True, slots=True)
class RequestAttributes:
    """What experiments may target."""

    surface: str = DEFAULT_SURFACE
    platform: str = ""
    has_location: bool = False


@dataclass(frozen=True, slots=True)
class LayerAssignment:
    """One layer's outcome for `recsys experiments assign` (experiment and arm "" when none)."""

    layer: str
    bucket: int
    experiment: str
    arm: str
    forced: bool = False


def _slot_twin(sample: Any) -> type[Any] | None:
    """A plain class with the slots of ``sample``'s frozen slots dataclass, or None.

    A frozen dataclass's generated ``__init__`` sets each field through ``object.__setattr__``:
    about 0.5 µs for Exposure's five fields, which is most of the cost of a request that carries
    an exposure for each of 100 layers. An instance of the twin has the same memory layout, so
    its fields are set by ordinary slot stores (specialised by the interpreter) and its
    ``__class__`` then becomes the dataclass (CPython allows that between classes whose slots
    are the same): an equal object for about a third of the cost. Checked here on ``sample``
    (equal, same hash, same type after the swap); None when the dataclass is not a plain frozen
    slots dataclass any more (a ``__post_init__``, other slots), and callers then use the real
    constructor.
    """
    cls = type(sample)
    names = tuple(f.name for f in dataclasses.fields(cls))
    if getattr(cls, "__slots__", None) != names or hasattr(cls, "__post_init__"):
        return None
    twin = type(f"_{cls.__name__}Slots", (), {"__slots__": names})
    try:
        probe = twin()
        for name in names:
            setattr(probe, name, getattr(sample, name))
        probe.__class__ = cls
    except TypeError:  # layouts differ after all
        return None
    if type(probe) is not cls or probe != sample or hash(probe) != hash(sample):
        return None
    return twin


class _ArmInfo(NamedTuple):
    layer_index: int
    layer: str
    experiment: str
    arm: str


_Label = tuple[str, str, str]
"""(layer, experiment, arm)"""


def _interned_labels(arms: Sequence[_ArmInfo]) -> tuple[_Label, ...]:
    """(layer, experiment, arm) per global arm, with equal strings shared: fewer distinct objects
    for the request path to touch (arm names such as "control" repeat across experiments)."""
    return tuple((sys.intern(i.layer), sys.intern(i.experiment), sys.intern(i.arm)) for i in arms)


class Assigner:
    """An immutable compiled snapshot of one version of the experiments document."""

    def __init__(self, config: ExperimentConfig, version: str) -> None:
        self.config = config
        self.version = version
        self._exposure_slots = _slot_twin(Exposure("", "", "", 0, False))
        self._assignment_slots = _slot_twin(Assignment((), PipelineParams(), version))
        self._compile(config)

    # -- compilation ---------------------------------------------------------------------------

    def _compile(self, config: ExperimentConfig) -> None:
        layers = config.layers
        n_layers = len(layers)
        rows = n_layers + 1  # the global holdout is the last row
        running = [(i, exp) for i, layer in enumerate(layers) for exp in layer.experiments]
        running = [(i, exp) for i, exp in running if exp.running]
        n_running = len(running)
        holdout_exp = n_running
        sentinel = n_running + 1  # experiment index of "none" in row r is sentinel + r
        n_exps = sentinel + rows

        salts = [hashing.layer_key(layer.salt) for layer in layers]
        salts.append(hashing.holdout_key(config.holdout.salt))
        sizes = [layer.num_buckets for layer in layers] + [config.num_buckets]
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.uint64)
        owner = np.repeat(np.arange(sentinel, n_exps, dtype=np.int32), sizes)
        exp_row = np.empty(n_exps, dtype=np.int64)
        exp_keys = np.zeros(n_exps, dtype=np.uint64)
        thresholds: list[int] = []
        arm_info: list[_ArmInfo] = []
        exp_first_arm: list[int] = []
        row_start = offsets.tolist()
        for e, (i, exp) in enumerate(running):
            for start, end in exp.buckets:
                owner[row_start[i] + start : row_start[i] + end] = e
            exp_first_arm.append(len(arm_info))
            thresholds += [
                (e << 32) + t for t in hashing.arm_thresholds([a.weight for a in exp.arms])
            ]
            arm_info += [_ArmInfo(i, layers[i].name, exp.name, a.name) for a in exp.arms]
        exp_row[:n_running] = [i for i, _ in running]
        exp_keys[:n_running] = [hashing.experiment_key(exp.salt, exp.epoch) for _, exp in running]
        # the holdout: one experiment with one arm, owning the holdout buckets of the last row
        for start, end in config.holdout.buckets:
            owner[row_start[n_layers] + start : row_start[n_layers] + end] = holdout_exp
        exp_row[holdout_exp] = n_layers
        exp_first_arm.append(len(arm_info))
        thresholds.append((holdout_exp + 1) << 32)
        arm_info.append(_ArmInfo(n_layers, HOLDOUT_LAYER, HOLDOUT_EXPERIMENT, HOLDOUT_ARM))
        exp_row[sentinel:] = np.arange(rows)
        for r in range(rows):
            name = layers[r].name if r < n_layers else HOLDOUT_LAYER
            exp_first_arm.append(len(arm_info))
            thresholds.append((sentinel + r + 1) << 32)
            arm_info.append(_ArmInfo(r, name, _NO_EXPERIMENT, ""))

        self._n_layers = n_layers
        self._salts = np.array(salts, dtype=np.uint64)
        self._sizes = np.array(sizes, dtype=np.uint64)
        self._offsets = offsets
        self._owner = owner
        self._exp_keys = exp_keys
        self._exp_prefix = np.arange(n_exps, dtype=np.uint64) << np.uint64(32)
        self._thresholds = np.array(thresholds, dtype=np.uint64)
        self._arm_info = tuple(arm_info)
        self._labels = _interned_labels(arm_info)
        self._real_arms = exp_first_arm[holdout_exp]  # arms below this index are experiment arms
        self._holdout_arm = exp_first_arm[holdout_exp]
        self._compile_targeting(config, running, exp_row, sentinel)
        self._compile_params(config, running, exp_first_arm)
        self._compile_overrides(config, running, exp_first_arm)
        self._compile_param_keys()
        self._compile_label_table()

    def _compile_targeting(
        self,
        config: ExperimentConfig,
        running: list[tuple[int, Experiment]],
        exp_row: npt.NDArray[np.int64],
        sentinel: int,
    ) -> None:
        """One experiment -> experiment-or-none table per class of (surface, platform, location)."""
        targeted = [(e, exp.targeting) for e, (_, exp) in enumerate(running)]
        targeted = [(e, t) for e, t in targeted if not t.is_everyone]
        self._surfaces: dict[str, int] = {}
        self._platforms: dict[str, int] = {}
        self._class_tables: list[npt.NDArray[np.int32]] | None = None
        if not targeted:
            return
        surfaces = sorted({s for _, t in targeted for s in t.surfaces or ()})
        platforms = sorted({p for _, t in targeted for p in t.platforms or ()})
        self._surfaces = {s: i for i, s in enumerate(surfaces)}
        self._platforms = {p: i for i, p in enumerate(platforms)}
        other = "\0other"  # any value no rule names
        identity = np.arange(len(exp_row), dtype=np.int32)
        tables: list[npt.NDArray[np.int32]] = []
        for surface in [*surfaces, other]:
            for platform in [*platforms, other]:
                for has_location in (False, True):
                    table = identity.copy()
                    for e, t in targeted:
                        if not t.matches(surface, platform, has_location):
                            table[e] = sentinel + exp_row[e]
                    tables.append(table)
        self._class_matrix = np.stack(tables)
        self._class_tables = list(self._class_matrix)

    def _class_of(self, attributes: RequestAttributes) -> int:
        s = self._surfaces.get(attributes.surface, len(self._surfaces))
        p = self._platforms.get(attributes.platform, len(self._platforms))
        return (s * (len(self._platforms) + 1) + p) * 2 + int(attributes.has_location)

    def _compile_params(
        self,
        config: ExperimentConfig,
        running: list[tuple[int, Experiment]],
        exp_first_arm: list[int],
    ) -> None:
        names = [f.name for f in dataclasses.fields(PipelineParams)]
        defaults = dataclasses.asdict(config.defaults)
        launched = dict(defaults)
        owner_layer: dict[str, int] = {}
        for i, layer in enumerate(config.layers):
            launched.update(layer.launch_defaults)
            for key in layer.launch_defaults:
                owner_layer[key] = i
            for exp in layer.experiments:
                for arm in exp.arms:
                    for key in arm.params:
                        owner_layer[key] = i
        self._launched = launched
        self._holdout_values = tuple(defaults[n] for n in names)
        self._base_values = tuple(launched[n] for n in names)
        self._base_params = PipelineParams(*self._base_values)
        self._holdout_params = PipelineParams(*self._holdout_values)
        n_arms = len(self._arm_info)
        owners: list[tuple[int, int, tuple[Any, ...]]] = []
        for p, name in enumerate(names):
            if name not in owner_layer:
                continue
            table = [launched[name]] * n_arms
            for e, (_, exp) in enumerate(running):
                for k, arm in enumerate(exp.arms):
                    if name in arm.params:
                        table[exp_first_arm[e] + k] = arm.params[name]
            owners.append((p, owner_layer[name], tuple(table)))
        self._param_owners = tuple(owners)
        self._param_names = tuple(names)

    def _compile_label_table(self) -> None:
        """Per global arm, the label its exposure carries (experiment arms and the holdout's)
        or None (the "no experiment" arm of each row): one ``take`` gives a request its labels."""
        table = np.full(len(self._labels), None, dtype=object)
        for a, label in enumerate(self._labels):
            if a < self._real_arms or a == self._holdout_arm:
                table[a] = label
        self._label_table = table

    def _compile_param_keys(self) -> None:
        """Per parameter owner, each arm's value as a small id (equal values, equal type: one
        id), so that the parameters of a request are found by the tuple of its ids: the
        distinct combinations are few (a handful of values per parameter) and each is built
        once, not per request."""
        tables: list[tuple[int, tuple[int, ...]]] = []
        self._param_choices: list[tuple[Any, ...]] = []
        for _, layer, table in self._param_owners:
            ids: dict[tuple[type, Any], int] = {}
            column = tuple(ids.setdefault((type(v), v), len(ids)) for v in table)
            tables.append((layer, column))
            self._param_choices.append(tuple(v for _, v in ids))
        self._param_keys = tuple(tables)
        self._params_by_key: dict[tuple[int, ...], PipelineParams] = {}

    def _params_for(self, key: tuple[int, ...]) -> PipelineParams:
        values = list(self._base_values)
        for (p, _, _), choices, k in zip(self._param_owners, self._param_choices, key, strict=True):
            values[p] = choices[k]
        params = PipelineParams(*values)
        if len(self._params_by_key) < _MAX_PARAM_COMBINATIONS:
            self._params_by_key[key] = params  # a race builds an equal object twice: harmless
        return params

    def _compile_overrides(
        self,
        config: ExperimentConfig,
        running: list[tuple[int, Experiment]],
        exp_first_arm: list[int],
    ) -> None:
        """QA overrides: user -> {layer index: global arm index}, for experiments not killed."""
        # Forcing a stopped experiment's arm is allowed (QA before launch): give its arms indices
        # after the real ones so they resolve to names and parameters like any arm.
        index = {exp.name: e for e, (_, exp) in enumerate(running)}
        extra_info: list[_ArmInfo] = []
        extra_tables: dict[int, list[Any]] = {p: [] for p, _, _ in self._param_owners}
        forced: dict[str, dict[int, int]] = {}
        names = self._param_names
        for user_id, choices in config.test_users.items():
            per_layer: dict[int, int] = {}
            for exp_name, arm_name in choices.items():
                found = config.find(exp_name)
                if found is None or found[1].status == "killed":
                    continue
                layer_index, exp = found
                k = next(j for j, a in enumerate(exp.arms) if a.name == arm_name)
                if exp_name in index:
                    per_layer[layer_index] = exp_first_arm[index[exp_name]] + k
                    continue
                per_layer[layer_index] = len(self._arm_info) + len(extra_info)
                arm = exp.arms[k]
                extra_info.append(_ArmInfo(layer_index, exp.layer, exp.name, arm.name))
                for p, _, _table in self._param_owners:
                    extra_tables[p].append(arm.params.get(names[p], self._launched[names[p]]))
            if per_layer:
                forced[user_id] = per_layer
        if extra_info:
            self._arm_info = (*self._arm_info, *extra_info)
            self._labels = _interned_labels(self._arm_info)
            self._param_owners = tuple(
                (p, layer, (*table, *extra_tables[p])) for p, layer, table in self._param_owners
            )
        self._overrides = forced

    # -- the request path ----------------------------------------------------------------------

    def _rows(
        self, user_id: str, attributes: RequestAttributes
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.uint64]]:
        """The global arm index and bucket of every row (layers, then the holdout)."""
        user = hashing.uint64_constant(hashing.user_key(user_id))
        z = hashing.mix64_array(self._salts ^ user)
        buckets = z % self._sizes
        exps = self._owner.take(buckets + self._offsets)
        if self._class_tables is not None:
            exps = self._class_tables[self._class_of(attributes)].take(exps)
        z = self._exp_keys.take(exps)
        z ^= user
        hashing.mix64_array(z)
        z >>= _POINT_SHIFT
        z |= self._exp_prefix.take(exps)
        return self._thresholds.searchsorted(z, side="right"), buckets

    def _arms(self, user_id: str, attributes: RequestAttributes) -> tuple[list[int], list[int]]:
        """:meth:`_rows` as lists."""
        arms, buckets = self._rows(user_id, attributes)
        return arms.tolist(), buckets.tolist()

    def _rows_many(
        self, user_ids: Sequence[str], attributes: Sequence[RequestAttributes]
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.uint64]]:
        """:meth:`_rows` for a batch: the same operations over a (requests x rows) matrix."""
        users = np.array([hashing.user_key(u) for u in user_ids], dtype=np.uint64)[:, None]
        z = hashing.mix64_array(self._salts[None, :] ^ users)
        buckets = z % self._sizes
        exps = self._owner.take(buckets + self._offsets)
        if self._class_tables is not None:
            classes = np.array([self._class_of(a) for a in attributes], dtype=np.intp)
            exps = self._class_matrix[classes[:, None], exps]
        z = hashing.mix64_array(self._exp_keys.take(exps) ^ users)
        z >>= _POINT_SHIFT
        z |= self._exp_prefix.take(exps)
        return self._thresholds.searchsorted(z, side="right"), buckets

    def assign(self, user_id: str, attributes: RequestAttributes) -> Assignment:
        """Exposures (one per layer where the user is in a running experiment) and parameters."""
        if self.config.kill_switch:
            return Assignment((), self._base_params, self.version)
        arms, buckets = self._rows(user_id, attributes)
        labels: list[_Label | None] = self._label_table.take(arms).tolist()
        return self._assignment(user_id, labels, buckets.tolist(), arms)

    def assign_many(
        self, user_ids: Sequence[str], attributes: Sequence[RequestAttributes]
    ) -> list[Assignment]:
        """:meth:`assign` for a batch of requests, with the numpy work done once for all."""
        if len(user_ids) != len(attributes):
            raise ValueError(
                f"assign_many: {len(user_ids)} user ids but {len(attributes)} attributes; "
                "expected one attributes per user id"
            )
        if self.config.kill_switch or not user_ids:
            return [Assignment((), self._base_params, self.version) for _ in user_ids]
        arms, buckets = self._rows_many(user_ids, attributes)
        labels: list[list[_Label | None]] = self._label_table.take(arms).tolist()
        bucket_lists: list[list[int]] = buckets.tolist()
        return [
            self._assignment(user_ids[r], labels[r], bucket_lists[r], arms[r])
            for r in range(len(user_ids))
        ]

    def _assignment(
        self,
        user_id: str,
        labels: list[_Label | None],
        buckets: list[int],
        arms: npt.NDArray[np.intp],
    ) -> Assignment:
        """``labels`` per row: the arm's (layer, experiment, arm) where it gives an exposure, the
        holdout's in the holdout row when the user is held out, else None."""
        forced = self._overrides.get(user_id)
        slots = self._exposure_slots
        if forced is not None or labels[-1] is not None or slots is None:
            return self._assign_special(arms.tolist(), buckets, forced or {})
        # The common case, once per layer: plain slot stores, then the class swap (_slot_twin).
        exposures: list[Exposure] = []
        for label, b in zip(labels, buckets, strict=True):
            if label is not None:
                x = slots()
                x.layer, x.experiment, x.arm = label
                x.bucket = b
                x.forced = False
                x.__class__ = Exposure
                exposures.append(x)
        key = tuple([column[arms[layer]] for layer, column in self._param_keys])
        params = self._params_by_key.get(key) or self._params_for(key)
        return self._new_assignment(tuple(exposures), params)

    def _new_assignment(
        self, exposures: tuple[Exposure, ...], params: PipelineParams
    ) -> Assignment:
        slots = self._assignment_slots
        if slots is None:
            return Assignment(exposures, params, self.version)
        result = slots()
        result.exposures = exposures
        result.params = params
        result.config_version = self.version
        result.__class__ = Assignment
        assert isinstance(result, Assignment)  # for mypy; also true at run time
        return result

    def _assign_special(
        self, arms: list[int], buckets: list[int], forced: Mapping[int, int]
    ) -> Assignment:
        """The holdout and QA overrides: rare, so clarity over speed."""
        holdout = arms[-1] == self._holdout_arm
        result: list[Exposure] = []
        values = list(self._holdout_values if holdout else self._base_values)
        for row, (a, b) in enumerate(zip(arms, buckets, strict=True)):
            is_forced = row in forced
            arm = forced.get(row, a)
            info = self._arm_info[arm]
            if row == self._n_layers and holdout:
                result.append(Exposure(info.layer, info.experiment, info.arm, b, False))
            elif is_forced or (not holdout and arm < self._real_arms):
                result.append(Exposure(info.layer, info.experiment, info.arm, b, is_forced))
            else:
                continue
            for p, layer, table in self._param_owners:
                if layer == row:
                    values[p] = table[arm]
        return Assignment(tuple(result), PipelineParams(*values), self.version)

    def assign_all_layers(
        self, user_id: str, attributes: RequestAttributes
    ) -> tuple[LayerAssignment, ...]:
        """Every layer in document order, experiment and arm "" where the user is in none."""
        _, buckets = self._arms(user_id, attributes)
        served = {e.layer: e for e in self.assign(user_id, attributes).exposures}
        result: list[LayerAssignment] = []
        for layer, b in zip(self.config.layers, buckets, strict=False):
            e = served.get(layer.name)
            if e is None:
                result.append(LayerAssignment(layer.name, b, "", ""))
            else:
                result.append(LayerAssignment(layer.name, b, e.experiment, e.arm, e.forced))
        return tuple(result)

    def in_holdout(self, user_id: str) -> bool:
        if self.config.kill_switch:
            return False
        arms, _ = self._arms(user_id, RequestAttributes())
        return arms[-1] == self._holdout_arm

    def exposure_label_sets(self) -> tuple[tuple[str, str, str], ...]:
        """Every (layer, experiment, arm) an exposure of this config can carry: a bounded set."""
        labels = [
            (layer.name, exp.name, arm.name)
            for layer in self.config.layers
            for exp in layer.experiments
            for arm in exp.arms
        ]
        labels.append((HOLDOUT_LAYER, HOLDOUT_EXPERIMENT, HOLDOUT_ARM))
        return tuple(labels)


def compile_config(
    doc: Mapping[str, Any],
    *,
    version: str = "0",
    known_model_versions: Collection[str] | None = None,
) -> Assigner:
    """Validate ``doc`` and compile it into an :class:`Assigner`; raises :class:`ConfigError`."""
    return Assigner(parse_config(doc, known_model_versions=known_model_versions), version)
