"""Replay: what did this customer see, and would it be the same again?

A logged exposure record names its serving snapshot; the snapshot's manifest (pipeline/archive.py)
holds the control documents it compiled and every artifact version it loaded. :class:`Replayer`
rebuilds that snapshot from the artifact root, re-runs the logged request through the same stage
list with the user's feature row as it was served (so the live feature store does not matter),
and compares items and scores with the record. The same machinery runs a corpus of logged
requests through a challenger model version and reports how its answers would differ
(:func:`diff_against`), and explains a served item's score by its features' contributions.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from recsys.artifacts import ArtifactError, ArtifactRoot
from recsys.experiments.stage import Assign
from recsys.geo import haversine_km
from recsys.pipeline.archive import SnapshotArchive, SnapshotArchiveError
from recsys.pipeline.capture import Capture
from recsys.pipeline.loading import SnapshotCompiler, SnapshotError
from recsys.pipeline.snapshot import ServingSnapshot
from recsys.pipeline.stages import build_stages
from recsys.ranking.features import FEATURE_NAMES, assemble_features, user_row_home
from recsys.ranking.model import ModelRejected
from recsys.ranking.model_cache import ModelCache
from recsys.ranking.stages import DEADLINE_UNRANKED, Rank, RankCost, UserFeatures
from recsys.serving.exposure import iter_exposure_lines
from recsys.stage import Batch, Stage, run_stages
from recsys.types import Exposure, Location, Request

SCORE_TOLERANCE = 1e-6
"""Largest score difference still called a reproduction (float32 scores normally match exactly;
a model engine compiled for another CPU may differ in the last bits)."""


class ReplayError(Exception):
    """A record cannot be replayed; the message names what is missing (a snapshot manifest, an
    artifact or model version that was retired, a malformed record)."""


def iter_records(directory: Path) -> Iterator[dict[str, Any]]:
    """Every exposure record in ``directory``, oldest file first (the log's own reader: plain
    and rotated files, a line cut short by a crash skipped)."""
    for _path, _number, record in iter_exposure_lines(directory):
        yield record


def find_record(directory: Path, request_id: str) -> dict[str, Any]:
    """The exposure record of ``request_id`` (ReplayError naming it when there is none)."""
    if not directory.is_dir():
        raise ReplayError(f"{directory}: no such exposure log directory")
    for record in iter_records(directory):
        if record.get("request_id") == request_id:
            return record
    raise ReplayError(f"no exposure record of request {request_id} in {directory}")


@dataclass(frozen=True)
class LoggedRequest:
    """One exposure record, parsed."""

    record: Mapping[str, Any]
    request: Request
    exposures: tuple[Exposure, ...]
    snapshot_id: str
    model_version: str
    sku_ids: tuple[int, ...]
    scores: tuple[float, ...]
    user_features: tuple[float, ...] | None
    degraded_reasons: tuple[str, ...]

    @classmethod
    def parse(cls, record: Mapping[str, Any]) -> LoggedRequest:
        try:
            location = record["location"]
            origin = record.get("answer_of")
            if record.get("cached") and origin is not None:
                location = origin["location"]  # a hit: the answer was computed there
            request = Request(
                request_id=str(record["request_id"]),
                user_id=str(record["user_id"]),
                num_results=int(record["num_results"]),
                location=None if location is None else Location(*map(float, location)),
                surface=str(record["surface"]),
                platform=str(record["platform"]),
                exclude_sku_ids=tuple(int(s) for s in record["exclude_sku_ids"]),
                hour=int(record["hour"]),
            )
            features = record["user_features"]
            return cls(
                record=record,
                request=request,
                exposures=tuple(
                    Exposure(
                        layer=str(e["layer"]),
                        experiment=str(e["experiment"]),
                        arm=str(e["arm"]),
                        bucket=int(e["bucket"]),
                        forced=bool(e["forced"]),
                    )
                    for e in record["exposures"]
                ),
                snapshot_id=str(record["snapshot_id"]),
                model_version=str(record["model_version"]),
                sku_ids=tuple(int(s) for s in record["sku_ids"]),
                # float32, as served: the record holds the shortest decimal of each float32
                scores=tuple(np.asarray(record["scores"], dtype=np.float32).astype(float).tolist()),
                user_features=None if features is None else tuple(float(v) for v in features),
                degraded_reasons=tuple(str(r) for r in record.get("degraded_reasons", ())),
            )
        except (KeyError, TypeError, ValueError) as e:
            where = record.get("request_id", "?") if isinstance(record, Mapping) else "?"
            raise ReplayError(
                f"record {where}: not a replayable exposure record (field {e}); records written "
                "before snapshot ids existed cannot be replayed"
            ) from e


@dataclass(frozen=True)
class Replay:
    """One logged request run again."""

    logged: LoggedRequest
    sku_ids: tuple[int, ...]
    scores: tuple[float, ...]
    exposures: tuple[Exposure, ...]
    model_version: str

    @property
    def same_items(self) -> bool:
        return self.sku_ids == self.logged.sku_ids

    @property
    def max_score_difference(self) -> float:
        if len(self.scores) != len(self.logged.scores):
            return math.inf
        return max(
            (abs(a - b) for a, b in zip(self.scores, self.logged.scores, strict=True)),
            default=0.0,
        )

    @property
    def reproduced(self) -> bool:
        return (
            self.same_items
            and self.exposures == self.logged.exposures
            and self.model_version == self.logged.model_version
            and self.max_score_difference <= SCORE_TOLERANCE
        )

    @property
    def exact(self) -> bool:
        return self.reproduced and self.max_score_difference == 0.0


class LoggedFeatures:
    """The user-features stage of a replay: the row the record holds, not the live store's."""

    name = "features"

    def __init__(self, rows: Sequence[tuple[float, ...] | None]) -> None:
        self._rows = rows

    def run(self, batch: Batch, snapshot: ServingSnapshot) -> Batch:
        batch = UserFeatures().run(batch, replace(snapshot, user_store=None))
        if all(r is None for r in self._rows):
            return batch
        tables = snapshot.tables
        features = np.zeros((len(batch), len(next(r for r in self._rows if r is not None))))
        for n, row in enumerate(self._rows):  # one per request
            if row is not None:
                features[n] = row
        return replace(
            batch,
            user_features=features,
            user_vectors=np.ascontiguousarray(features[:, : tables.dim], dtype=np.float32),
        )


class Replayer:
    """Rebuilds logged snapshots (cached by id) and re-runs logged requests through them."""

    def __init__(self, artifacts: Path, snapshots: Path) -> None:
        self.root = ArtifactRoot(artifacts)
        self.archive = SnapshotArchive(snapshots)
        self._models = ModelCache(self.root)
        self._compiler = SnapshotCompiler(self.root, self._models)
        self._snapshots: dict[str, ServingSnapshot] = {}

    def snapshot(self, snapshot_id: str) -> ServingSnapshot:
        cached = self._snapshots.get(snapshot_id)
        if cached is not None:
            return cached
        try:
            manifest = self.archive.read(snapshot_id)
        except SnapshotArchiveError as e:
            raise ReplayError(str(e)) from e
        self._check_artifacts(snapshot_id, manifest)
        docs = manifest["documents"]
        try:
            snapshot = self._compiler.initial(
                {name: doc["body"] for name, doc in docs.items()},
                str(docs["experiments"]["version"]),
                versions={name: int(doc["version"]) for name, doc in docs.items()},
            )
            extra = {
                version: self._models.get(name, version)
                for version, name in manifest["models"].items()
                if version not in snapshot.models
            }
        except (SnapshotError, ModelRejected) as e:
            raise ReplayError(f"snapshot {snapshot_id}: cannot rebuild it: {e}") from e
        if extra:  # versions the snapshot still held for their unload grace
            snapshot = replace(snapshot, models={**snapshot.models, **extra})
        self._snapshots[snapshot_id] = snapshot
        return snapshot

    def _check_artifacts(self, snapshot_id: str, manifest: Mapping[str, Any]) -> None:
        root = self.root
        try:
            needed = [
                ("index", root.index_dir(str(manifest["index_version"]))),
                ("features", root.features_dir(str(manifest["features_version"]))),
                ("world", root.world_dir(str(manifest["world_version"]))),
                *(
                    (f"model {name}", root.model_dir(str(name), str(version)))
                    for version, name in manifest["models"].items()
                ),
            ]
        except (ArtifactError, KeyError, AttributeError) as e:
            raise ReplayError(f"snapshot {snapshot_id}: its manifest is not usable: {e}") from e
        retired = [f"{what} {path.name}" for what, path in needed if not path.is_dir()]
        if retired:
            raise ReplayError(
                f"snapshot {snapshot_id}: retired from {root.path}: {', '.join(retired)}"
            )

    def replay(
        self,
        logged: LoggedRequest,
        model_version: str = "",
        snapshot: ServingSnapshot | None = None,
    ) -> Replay:
        """Run ``logged`` again on its snapshot (or ``snapshot``); ``model_version`` pins
        another model version (a challenger) instead of the one that served."""
        snapshot = snapshot or self.snapshot(logged.snapshot_id)
        plan = build_stages()
        assigned = run_stages(
            (*plan.per_request, Assign()), Batch(requests=(logged.request,)), snapshot
        )
        assignment = assigned.assignments[0]
        if model_version:
            assignment = replace(
                assignment, params=replace(assignment.params, model_version=model_version)
            )
        # The batched stages as served (the assign stage keeps the assignment given here), with
        # the user features as logged instead of a fresh read.
        stages: list[Stage[ServingSnapshot]] = []
        deadline: float | None = None
        for stage in plan.batched:
            if isinstance(stage, Capture):
                continue
            if isinstance(stage, UserFeatures):
                stage = LoggedFeatures([logged.user_features])
            if isinstance(stage, Rank) and DEADLINE_UNRANKED in logged.degraded_reasons:
                stage = Rank(RankCost(seconds_per_row=math.inf))  # as it was: no time to rank
                deadline = 0.0
            stages.append(stage)
        batch = run_stages(
            stages,
            Batch(
                requests=(logged.request,),
                deadlines=(deadline,),
                assignments=(assignment,),
            ),
            snapshot,
        )
        items = batch.items[0]
        return Replay(
            logged=logged,
            sku_ids=tuple(items.sku_ids.tolist()),
            scores=tuple(items.scores.astype(np.float64).tolist()),
            exposures=assignment.exposures,
            model_version=batch.model_versions[0],
        )

    def with_model(self, snapshot: ServingSnapshot, name: str, version: str) -> ServingSnapshot:
        """``snapshot`` with model ``name``/``version`` loaded as well (for a challenger)."""
        if version in snapshot.models:
            return snapshot
        try:
            model = self._models.get(name, version)
        except ModelRejected as e:
            raise ReplayError(f"model {name}/{version}: {e}") from e
        return replace(snapshot, models={**snapshot.models, version: model})

    def explain(self, logged: LoggedRequest) -> list[dict[str, Any]]:
        """Per served item, each feature's contribution to its score (LightGBM pred_contrib),
        largest first; the contributions and the bias add up to the model's raw score."""
        snapshot = self.snapshot(logged.snapshot_id)
        model = snapshot.models[logged.model_version]
        tables = snapshot.tables
        items = np.array(logged.sku_ids, dtype=np.int64)
        row = int(tables.user_rows([logged.request.user_id])[0])
        served = None if logged.user_features is None else np.array([logged.user_features])
        if logged.request.location is not None:
            lat, lon = logged.request.location.lat, logged.request.location.lon
        elif served is not None:
            home_lat, home_lon = user_row_home(served)
            lat, lon = float(home_lat[0]), float(home_lon[0])
        elif row >= 0:
            lat, lon = float(tables.user_home_lat[row]), float(tables.user_home_lon[row])
        else:
            lat, lon = snapshot.centre
        n = items.shape[0]
        features = assemble_features(
            tables,
            np.full(n, max(row, 0), dtype=np.int32),
            items,
            np.full(n, lat),
            np.full(n, lon),
            np.full(n, logged.request.hour, dtype=np.int8),
            None if served is None else np.repeat(served, n, axis=0),
        )
        contrib = np.asarray(model.booster.predict(features, pred_contrib=True, num_threads=1))
        out = []
        for i, sku in enumerate(items.tolist()):  # one per served item (at most num_results)
            parts = sorted(
                zip(FEATURE_NAMES, contrib[i, :-1].tolist(), features[i].tolist(), strict=True),
                key=lambda p: -abs(p[1]),
            )
            out.append(
                {
                    "rank": i + 1,
                    "sku_id": sku,
                    "score": logged.scores[i],
                    "bias": float(contrib[i, -1]),
                    "contributions": [
                        {"feature": f, "value": v, "contribution": c} for f, c, v in parts
                    ],
                }
            )
        return out


@dataclass
class DiffSlice:
    """How a challenger's answers differ from the logged ones over a set of requests."""

    requests: int = 0
    overlap: list[float] = field(default_factory=list)
    tau: list[float] = field(default_factory=list)
    shift: list[float] = field(default_factory=list)

    def add(self, overlap: float, tau: float, shift: float) -> None:
        self.requests += 1
        self.overlap.append(overlap)
        if not math.isnan(tau):
            self.tau.append(tau)
        self.shift.append(shift)

    def summary(self) -> dict[str, float]:
        return {
            "requests": self.requests,
            "top_k_overlap": float(np.mean(self.overlap)) if self.overlap else math.nan,
            "changed_share": 1.0 - float(np.mean(self.overlap)) if self.overlap else math.nan,
            "kendall_tau": float(np.mean(self.tau)) if self.tau else math.nan,
            "mean_score_shift": float(np.mean(self.shift)) if self.shift else math.nan,
        }


def diff_against(
    replayer: Replayer, logged: Iterable[LoggedRequest], model_name: str, version: str
) -> dict[str, dict[str, dict[str, float]]]:
    """Run each logged request through ``version`` instead of the model that served it.

    Per request: the share of the served items the challenger would also serve (top-k overlap;
    1 - overlap is the share that would change), Kendall's tau between the two orders over the
    items either list holds, and the shift of the mean served score (challenger minus logged).
    Reported overall
    and per slice (surface; district of the delivery point; each experiment layer's arm).
    """
    slices: dict[str, dict[str, DiffSlice]] = defaultdict(lambda: defaultdict(DiffSlice))
    for entry in logged:
        snapshot = replayer.with_model(replayer.snapshot(entry.snapshot_id), model_name, version)
        challenger = replayer.replay(entry, model_version=version, snapshot=snapshot)
        logged_items = list(entry.sku_ids)
        k = max(len(logged_items), 1)
        overlap = len(set(logged_items) & set(challenger.sku_ids)) / k
        union = list(dict.fromkeys([*logged_items, *challenger.sku_ids]))
        tau = _kendall(union, logged_items, list(challenger.sku_ids))
        shift = (
            float(np.mean(challenger.scores) - np.mean(entry.scores))
            if (challenger.scores and entry.scores)
            else 0.0
        )
        for group, key in _slices_of(entry, snapshot):
            slices[group][key].add(overlap, tau, shift)
    return {
        group: {key: s.summary() for key, s in sorted(by_key.items())}
        for group, by_key in sorted(slices.items())
    }


def _kendall(items: list[int], first: list[int], second: list[int]) -> float:
    """Kendall's tau between two rankings over ``items`` (an item a list lacks ranks last)."""
    if len(items) < 2:
        return math.nan
    a = {s: i for i, s in enumerate(first)}
    b = {s: i for i, s in enumerate(second)}
    tau = stats.kendalltau(
        [a.get(s, len(first)) for s in items], [b.get(s, len(second)) for s in items]
    )
    return float(tau.statistic)


def _slices_of(entry: LoggedRequest, snapshot: ServingSnapshot) -> Iterator[tuple[str, str]]:
    yield "overall", "all"
    yield "surface", entry.request.surface
    yield "district", _district(entry, snapshot)
    for e in entry.exposures:
        yield "arm", f"{e.layer}/{e.experiment}/{e.arm}"


def _district(entry: LoggedRequest, snapshot: ServingSnapshot) -> str:
    """The district of the delivery point: that of the nearest restaurant to the request's
    location, else to the user's home (from the logged feature row); "unknown" without either."""
    if entry.request.location is not None:
        lat, lon = entry.request.location.lat, entry.request.location.lon
    elif entry.user_features is not None:
        home_lat, home_lon = user_row_home(np.array([entry.user_features]))
        lat, lon = float(home_lat[0]), float(home_lon[0])
    else:
        return "unknown"
    catalogue = snapshot.catalogue
    km = haversine_km(lat, lon, catalogue.restaurant_lat, catalogue.restaurant_lon)
    return f"d{int(catalogue.restaurant_district[int(np.argmin(km))])}"
