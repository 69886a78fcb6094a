"""A model version's training baseline compiled once into bins, and a whole batch binned at once.

The manifest's ``baseline`` (``recsys.ranking.evaluation.distribution_baseline``) holds, for every
feature and for the score, either decile edges with counts (numeric) or the category codes seen
with their counts (categorical). :meth:`BaselineBins.compile` turns it into what binning needs,
once per model version at snapshot load; :meth:`BaselineBins.slots` then bins a ``[rows,
features]`` matrix and the scores with one ``np.searchsorted`` (numeric) or one table lookup
(categorical) per column, no per-row Python.

Every column has *slots*, laid out one column after the other in one flat vector:

- numeric with inner edges ``e0..e_{m-1}``: ``below`` (under the training minimum), the baseline's
  ``m + 1`` bins ``(-inf, e0], (e0, e1], ..., (e_{m-1}, inf)`` restricted to the training range,
  ``above`` (over the training maximum), ``nan``;
- categorical with codes ``c0..c_{k-1}``: one slot per code, ``unseen`` (a code training never
  saw), ``nan``.

For PSI and Jensen-Shannon the live counts fold back onto the baseline's bins (below into the
first bin, above into the last; an unseen code is a bin of its own, baseline share 0); ``nan``,
``below``/``above`` and ``unseen`` are also reported as shares of their own.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

SCORE = "score"
"""The column name of the model score (beside the feature names)."""

IntArray = npt.NDArray[np.int64]


class BaselineError(ValueError):
    """A manifest's baseline cannot be compiled (the message names the column)."""


@dataclass(frozen=True, eq=False)
class Column:
    """One monitored column: where its slots start and how values map to them."""

    name: str
    kind: str
    """"numeric" or "categorical"."""
    offset: int
    """Index of the column's first slot in the flat count vector."""
    size: int
    """Number of slots (bins plus the out-of-range and nan slots)."""
    edges: npt.NDArray[np.float64]
    """Numeric: ``[nextafter(min, -inf), e0, .., e_{m-1}, max]``; categorical: empty."""
    lookup: IntArray
    """Categorical: code -> slot (``size - 2``, unseen, for codes training never saw)."""
    expected: npt.NDArray[np.float64]
    """Baseline counts per fold bin (numeric: m + 1 bins; categorical: k codes and unseen)."""
    baseline_missing: int

    @property
    def nan_slot(self) -> int:
        return self.size - 1

    def fold(self, slots: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """This column's slot counts folded onto the baseline's bins (nan dropped)."""
        if self.kind == "numeric":
            bins = slots[1:-2].copy()
            bins[0] += slots[0]
            bins[-1] += slots[-2]
            return bins
        return slots[:-1].copy()

    def out_of_range(self, slots: npt.NDArray[np.int64]) -> int:
        """Values outside the training range (numeric) or codes training never saw."""
        if self.kind == "numeric":
            return int(slots[0] + slots[-2])
        return int(slots[-2])


def _numeric(name: str, spec: Mapping[str, Any], offset: int) -> Column | None:
    edges = np.asarray(spec.get("edges", []), dtype=np.float64)
    counts = np.asarray(spec.get("counts", []), dtype=np.float64)
    if "min" not in spec or "max" not in spec:
        return None  # every training value was missing: nothing to compare against
    if counts.shape != (edges.size + 1,):
        raise BaselineError(f"baseline {name}: {counts.size} counts for {edges.size} edges")
    lo, hi = float(spec["min"]), float(spec["max"])
    extended = np.concatenate([[np.nextafter(lo, -np.inf)], edges, [hi]])
    if (np.diff(extended) < 0).any() or not np.isfinite(extended).all():
        raise BaselineError(f"baseline {name}: edges are not finite and increasing")
    return Column(
        name=name,
        kind="numeric",
        offset=offset,
        size=edges.size + 4,
        edges=extended,
        lookup=np.zeros(0, dtype=np.int64),
        expected=counts,
        baseline_missing=int(spec.get("missing", 0)),
    )


def _categorical(name: str, spec: Mapping[str, Any], offset: int) -> Column:
    values = np.asarray(spec.get("values", []), dtype=np.int64)
    counts = np.asarray(spec.get("counts", []), dtype=np.float64)
    if counts.shape != values.shape or (values < 0).any():
        raise BaselineError(f"baseline {name}: expected non-negative codes with one count each")
    k = values.size
    lookup = np.full(int(values.max()) + 1 if k else 0, k, dtype=np.int64)
    lookup[values] = np.arange(k)
    return Column(
        name=name,
        kind="categorical",
        offset=offset,
        size=k + 2,
        edges=np.zeros(0, dtype=np.float64),
        lookup=lookup,
        expected=np.concatenate([counts, [0.0]]),
        baseline_missing=int(spec.get("missing", 0)),
    )


@dataclass(frozen=True, eq=False)
class BaselineBins:
    """One model version's baseline, ready to bin live values into."""

    version: str
    columns: tuple[Column, ...]
    feature_index: IntArray
    """For each feature column (all but the score), its column in the model's feature matrix."""
    baseline_rows: int
    _offsets: IntArray = field(init=False, repr=False)
    _nan_slots: IntArray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        offsets = np.array([[c.offset] for c in self.columns], dtype=np.int64)
        object.__setattr__(self, "_offsets", offsets)
        object.__setattr__(self, "_nan_slots", np.array([[c.nan_slot] for c in self.columns]))

    @property
    def size(self) -> int:
        """Length of the flat slot-count vector."""
        last = self.columns[-1]
        return last.offset + last.size

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @classmethod
    def compile(
        cls, version: str, baseline: Mapping[str, Any], feature_names: Sequence[str]
    ) -> BaselineBins:
        """From a manifest's ``baseline`` and the model's feature order; every feature with a
        baseline is monitored, then the score."""
        specs = baseline.get("features", {})
        if not isinstance(specs, Mapping):
            raise BaselineError("baseline features: expected an object by feature name")
        columns: list[Column] = []
        index: list[int] = []
        offset = 0
        for i, name in enumerate(feature_names):
            spec = specs.get(name)
            if spec is None:
                continue
            column = (
                _categorical(name, spec, offset)
                if spec.get("kind") == "categorical"
                else _numeric(name, spec, offset)
            )
            if column is not None:
                columns.append(column)
                index.append(i)
                offset += column.size
        score = _numeric(SCORE, baseline.get(SCORE, {}), offset)
        if score is None:
            raise BaselineError("baseline score: expected numeric edges, counts, min and max")
        columns.append(score)
        return cls(
            version=version,
            columns=tuple(columns),
            feature_index=np.asarray(index, dtype=np.int64),
            baseline_rows=int(baseline.get("rows", 0)),
        )

    def slots(
        self, features: npt.NDArray[np.floating[Any]], scores: npt.NDArray[np.floating[Any]]
    ) -> IntArray:
        """``[columns, rows]`` flat slot index of every value (column offsets included): one
        ``searchsorted`` per numeric column, one table lookup per categorical one, and the NaN
        and offset fix-ups once over the whole matrix."""
        rows = features.shape[0]
        values = np.empty((len(self.columns), rows), dtype=np.float64)
        values[:-1] = features[:, self.feature_index].T
        values[-1] = scores
        out = np.empty(values.shape, dtype=np.int64)
        for j, column in enumerate(self.columns):
            if column.kind == "numeric":
                out[j] = np.searchsorted(column.edges, values[j], side="left")
            else:  # NaN and negative or unknown codes fail `known`: the unseen slot
                codes = values[j]
                known = (codes >= 0) & (codes < column.lookup.size)
                out[j] = np.where(
                    known, column.lookup[np.where(known, codes, 0).astype(np.intp)], column.size - 2
                )
        out = np.where(np.isnan(values), self._nan_slots, out)
        out += self._offsets
        return out

    def count(
        self,
        features: npt.NDArray[np.floating[Any]],
        scores: npt.NDArray[np.floating[Any]],
        groups: IntArray,
        n_groups: int,
    ) -> npt.NDArray[np.int64]:
        """``[n_groups, size]`` slot counts of the rows, each row in its group (one bincount)."""
        slots = self.slots(features, scores)
        flat = (groups[None, :] * self.size + slots).ravel()
        counts = np.bincount(flat, minlength=n_groups * self.size)
        return counts.reshape(n_groups, self.size)

    def column_counts(self, counts: npt.NDArray[np.int64]) -> dict[str, npt.NDArray[np.int64]]:
        """A flat slot-count vector split by column name."""
        return {c.name: counts[c.offset : c.offset + c.size] for c in self.columns}


class MonitoredModel(Protocol):
    """What the monitor reads of a loaded model version."""

    @property
    def manifest(self) -> Mapping[str, Any]: ...

    @property
    def feature_names(self) -> tuple[str, ...]: ...


class BaselineCache:
    """Compiled baselines of the loaded model versions, each compiled once when its version is
    first loaded (at snapshot build, off the request path). A version whose manifest has no
    usable baseline is not monitored (logged once), never refused: it still serves."""

    def __init__(self) -> None:
        self._compiled: dict[str, tuple[MonitoredModel, BaselineBins | None]] = {}

    def for_models(self, models: Mapping[str, MonitoredModel]) -> dict[str, BaselineBins]:
        kept: dict[str, tuple[MonitoredModel, BaselineBins | None]] = {}
        for version, model in models.items():
            hit = self._compiled.get(version)
            if hit is None or hit[0] is not model:
                hit = (model, _compile_or_none(version, model))
            kept[version] = hit
        self._compiled = kept
        return {version: bins for version, (_, bins) in kept.items() if bins is not None}


def _compile_or_none(version: str, model: MonitoredModel) -> BaselineBins | None:
    baseline = model.manifest.get("baseline")
    if not isinstance(baseline, Mapping):
        log.warning("model version %s has no training baseline: not monitored", version)
        return None
    try:
        return BaselineBins.compile(version, baseline, model.feature_names)
    except BaselineError as e:
        log.warning("model version %s: %s; not monitored", version, e)
        return None
