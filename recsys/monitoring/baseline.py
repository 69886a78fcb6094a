"""A model version's training baseline compiled once into bins, and a whole batch binned at once.

The manifest's ``baseline`` (``recsys.ranking.evaluation.distribution_baseline``) holds, for every
feature and for the score, either decile edges with counts (numeric) or the category codes seen
with their counts (categorical). :meth:`BaselineBins.compile` turns it into what binning needs,
once per model version at snapshot load; :class:`BaselineSet` then bins a ``[rows, features]``
matrix and the scores with one ``np.searchsorted`` over every column's keys and one table
lookup, no per-row Python.

Every column has *slots*, laid out one column after the other in one flat vector:

- numeric with inner edges ``e0..e_{m-1}``: ``below`` (under the training minimum), the baseline's
  ``m + 1`` bins ``(-inf, e0], (e0, e1], ..., (e_{m-1}, inf)`` restricted to the training range,
  ``above`` (over the training maximum), ``nan``;
- categorical with codes ``c0..c_{k-1}``: one slot per code, ``unseen`` (a code training never
  saw), ``nan``.

For PSI and Jensen-Shannon the live counts fold back onto the baseline's bins (below into the
first bin, above into the last; an unseen code is a bin of its own, baseline share 0); ``nan``,
``below``/``above`` and ``unseen`` are also reported as shares of their own.

:class:`BaselineSet` holds a snapshot's compiled versions and stacks them, so that the
monitor stage bins a batch split over many model versions in one pass; one version's counts
(:meth:`BaselineBins.count`) go through the same binning.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
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

    def count(
        self,
        features: npt.NDArray[np.floating[Any]],
        scores: npt.NDArray[np.floating[Any]],
        groups: IntArray,
        n_groups: int,
    ) -> npt.NDArray[np.int64]:
        """``[n_groups, size]`` slot counts of the rows, each row in its group: this version
        alone through :class:`BaselineSet`'s binning (values are float32, as the rank stage
        makes them), so there is one binning for one version and for many."""
        rows = features.shape[0]
        counts = np.zeros(n_groups * self.size, dtype=np.int64)
        if rows:
            slots = BaselineSet({self.version: self}).slots(
                features,
                np.arange(rows, dtype=np.int64),
                scores,
                np.zeros(rows, dtype=np.int64),
                np.asarray(groups, dtype=np.int64) * self.size,
            )
            counts = np.bincount(slots, minlength=n_groups * self.size)
        return counts.reshape(n_groups, self.size)

    def column_counts(self, counts: npt.NDArray[np.int64]) -> dict[str, npt.NDArray[np.int64]]:
        """A flat slot-count vector split by column name."""
        return {c.name: counts[c.offset : c.offset + c.size] for c in self.columns}


def _edge_keys(column: Column) -> IntArray:
    """A numeric column's edges as order keys (:func:`_order_keys`), each edge e first made the
    largest float32 <= e: for a float32 x, x > e exactly when x > that."""
    e32 = column.edges.astype(np.float32)
    e32 = np.where(e32 > column.edges, np.nextafter(e32, np.float32(-np.inf)), e32)
    return _order_keys(e32)


def _order_keys(values: npt.NDArray[np.float32]) -> IntArray:
    """float32 values as int64 keys in [0, 2**32) that sort as the values do (-0.0 as 0.0;
    NaN keys are meaningless: callers mask NaN)."""
    bits = (values + np.float32(0.0)).view(np.int32).astype(np.int64)
    return np.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + (1 << 31)


class BaselineSet(Mapping[str, BaselineBins]):
    """The compiled baselines of a snapshot's model versions, by version, and all of them
    stacked into one search, so that a batch split over many versions is binned in one pass
    (:meth:`slots`); built once per snapshot, off the request path.

    Every (version, column) is a segment of one sorted vector of int64 keys, its index in the
    high 32 bits and its boundaries as order-preserving float32 bits in the low ones, closed by
    a sentinel: a numeric column's edges; a
    categorical column's codes ``0..n`` as the largest float32 below each (so a value counts
    the codes it has reached, as truncating it to a code does). One ``searchsorted`` of every
    value's key then gives a position that one lookup turns into its slot: the numeric bin, the
    code's slot, or unseen (a negative code, one past the table, or one training never saw).

    A row reads its version's fields (the keys' high bits, the nan slots, and the feature
    column at each place unless every version reads the same, as versions of one model do) with
    one gather. A version that monitors fewer columns than another has absent places, dropped.
    The score is always the last place."""

    def __init__(self, baselines: Mapping[str, BaselineBins]) -> None:
        self._bins = dict(sorted(baselines.items()))
        self._versions = tuple(self._bins)
        self._index = {version: i for i, version in enumerate(self._versions)}
        self.sizes = np.array([b.size for b in self._bins.values()], dtype=np.int64)
        """Length of each version's flat slot-count vector, in :attr:`versions` order."""
        width = max((len(b.columns) for b in self._bins.values()), default=1)
        source, key_base, nan_slot, present = np.zeros((4, len(self._bins), width), np.int64)
        keyed: list[IntArray] = []
        slot_of: list[IntArray] = []
        bounds = [0]  # where each version's keys start, and the last one's end
        for v, bins in enumerate(self._bins.values()):
            places = [*range(len(bins.columns) - 1), width - 1]
            source[v, places[:-1]] = bins.feature_index
            for place, column in zip(places, bins.columns, strict=True):
                present[v, place] = 1
                key_base[v, place] = len(keyed) << 32
                nan_slot[v, place] = column.offset + column.nan_slot
                if column.kind == "numeric":
                    keys = _edge_keys(column)
                    slots = np.arange(keys.size + 1)
                else:
                    codes = np.arange(column.lookup.size + 1, dtype=np.float32)
                    keys = _order_keys(np.nextafter(codes, np.float32(-np.inf)))
                    unseen = [column.size - 2]
                    slots = np.concatenate([unseen, column.lookup, unseen])
                keyed.append(np.append(keys, _SENTINEL) + key_base[v, place])
                slot_of.append(slots + column.offset)
            bounds.append(sum(k.size for k in keyed))
        self._keys = np.concatenate([np.zeros(0, dtype=np.int64), *keyed])
        self._slot_of = np.concatenate([np.zeros(0, dtype=np.int64), *slot_of])
        self._bounds = np.array(bounds, dtype=np.int64)
        # Laid out [..., places, versions]: a batch's values are binned place by place (the
        # keys of one column one after the other search faster than a row's mixed columns).
        self._by_version = np.stack([key_base.T, nan_slot.T])
        """``[2, places, versions]``: the keys' high bits and the nan slots, one gather."""
        self._present = present.T
        self._ragged = not present.all()
        # Versions of one model read the same feature columns (their edges and slot counts
        # differ): then the sources are read once, not gathered per row.
        self._same_sources = not self._ragged and bool((source == source[:1]).all())
        self._source = source.T[:-1, :1] if self._same_sources else source.T[:-1]

    def __getitem__(self, version: str) -> BaselineBins:
        return self._bins[version]

    def __iter__(self) -> Iterator[str]:
        return iter(self._bins)

    def __len__(self) -> int:
        return len(self._bins)

    @property
    def versions(self) -> tuple[str, ...]:
        """The versions in sorted order: index ``i`` in :meth:`indices` is ``versions[i]``."""
        return self._versions

    def indices(self, versions: Sequence[str]) -> IntArray:
        """Each version's index in :attr:`versions`; -1 for a version without a baseline."""
        index = self._index
        return np.array([index.get(v, -1) for v in versions], dtype=np.int64)

    def slots(
        self,
        features: npt.NDArray[np.floating[Any]],
        rows: IntArray,
        scores: npt.NDArray[np.floating[Any]],
        versions: IntArray,
        starts: IntArray,
    ) -> IntArray:
        """The slot of every monitored value of every row in one flat count vector. Row ``r``
        is the feature row ``features[rows[r]]`` and the score ``scores[r]``, binned into the
        baseline of version ``versions[r]`` (an index in :attr:`versions`), its slots shifted
        by ``starts[r]`` (where its count vector starts in the flat one).

        Values are binned as float32 (as the rank stage makes them), in a fixed number of numpy
        calls whatever the number of versions and columns."""
        source = self._source if self._same_sources else self._source[:, versions]
        key_base, nan_slot = self._by_version[:, :, versions]  # [places, rows] each
        values = np.empty(key_base.shape, dtype=np.float32)
        values[:-1] = features.take(source + rows * features.shape[1])
        values[-1] = scores
        keys = _order_keys(values) + key_base
        # Only the span of the versions present is searched: a batch of few versions (one, most
        # often) pays for a binary search over their keys, not over every version's.
        lo, hi = self._bounds[versions.min()], self._bounds[versions.max() + 1]
        at = self._keys[lo:hi].searchsorted(keys.ravel(), side="left") + lo
        out: IntArray = np.where(np.isnan(values), nan_slot, self._slot_of[at].reshape(keys.shape))
        out += starts
        return out[self._present[:, versions] == 1] if self._ragged else out.ravel()


_SENTINEL = (1 << 32) - 1
"""The last key of every segment: no value's key is above it (NaN's are binned apart anyway),
so a value's position never runs into the next segment's."""


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

    def for_models(self, models: Mapping[str, MonitoredModel]) -> BaselineSet:
        kept: dict[str, tuple[MonitoredModel, BaselineBins | None]] = {}
        for version, model in models.items():
            hit = self._compiled.get(version)
            if hit is None or hit[0] is not model:
                hit = (model, _compile_or_none(version, model))
            kept[version] = hit
        self._compiled = kept
        return BaselineSet(
            {version: bins for version, (_, bins) in kept.items() if bins is not None}
        )


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
