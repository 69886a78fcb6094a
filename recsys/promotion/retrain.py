"""Retrain a ranker from what the service logged: exposures joined with outcomes.

Rows are the impressed items of every complete joined request in ``[since, until)`` (an
exposure record holds the user's feature row as the ranker used it, the served items in order,
the request's location and hour; the outcome events say which were seen, clicked, ordered).
Features come from the one feature code path (``ranking.features.assemble_features`` with the
logged user row), labels are 2 ordered / 1 clicked / 0 impressed, a request is a query group.
Users are split by a hash of their id: ``HELDOUT_BUCKETS`` of 100 held out (their requests are
the gates' held-out data, :class:`~recsys.promotion.holdout.EvalSet`, scored by champion and
challenger alike), ``VALIDATION_BUCKETS`` for early stopping, the rest train.

The version is registered with its lineage: the parent (production when it was trained), the
exposure and outcome windows with content hashes of the records read, the join's counts, the
feature and world versions, the code version, parameters and offline metrics (in the manifest).
``shuffle_labels`` trains on labels permuted across rows: the sabotage run of ``recsys loop``,
a model that has learned nothing the gates and the canary must refuse.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from recsys.outcomes.join import JoinedRequest, JoinStats, join_outcomes
from recsys.outcomes.reader import iter_outcomes
from recsys.promotion.holdout import DistrictLocator, EvalSet, fingerprint
from recsys.ranking.features import FeatureTables, assemble_features, user_row_home
from recsys.ranking.model import load_model_version, save_model_version
from recsys.ranking.registry import ModelRegistry, RegistryError
from recsys.ranking.training import RankerParams, Split, fit_ranker
from recsys.serving.exposure import iter_exposure_lines

HELDOUT_BUCKETS = 10
VALIDATION_BUCKETS = 10
"""Of 100 buckets of sha256(user id): 0-9 held out for the gates, 10-19 validation."""
RETRAIN_PARAMS = RankerParams(num_trees=200, min_data_in_leaf=20, num_leaves=31)
"""Logged windows are smaller than the build's log: smaller leaves, fewer rounds."""


class RetrainError(RegistryError):
    """Too little logged data in the window, or none joined; the message says what was found."""


@dataclass(frozen=True)
class LoggedData:
    """The joined window as arrays, one row per impressed item, requests contiguous."""

    features: npt.NDArray[np.float32]
    labels: npt.NDArray[np.int32]
    group_sizes: npt.NDArray[np.int64]
    position: npt.NDArray[np.int16]
    group_bucket: npt.NDArray[np.int64]
    group_district: npt.NDArray[np.str_]
    group_surface: npt.NDArray[np.str_]
    group_new_user: npt.NDArray[np.bool_]
    lineage: Mapping[str, Any] = field(default_factory=dict)

    def split(self, buckets: npt.NDArray[np.bool_]) -> Split:
        rows = np.repeat(buckets, self.group_sizes)
        return Split(
            self.features[rows], self.labels[rows], self.group_sizes[buckets], self.position[rows]
        )

    def eval_set(self) -> EvalSet:
        held = self.group_bucket < HELDOUT_BUCKETS
        split = self.split(held)
        return EvalSet(
            features=split.features,
            labels=split.labels,
            group_sizes=split.group_sizes,
            district=self.group_district[held],
            surface=self.group_surface[held],
            new_user=self.group_new_user[held],
            description=(
                f"held-out users' logged requests {self.lineage.get('window', '')}: "
                f"{split.group_sizes.shape[0]:,} requests, {split.rows:,} impressed rows"
            ),
            content_hash=fingerprint(split.features, split.labels, split.group_sizes),
        )


@dataclass(frozen=True)
class RetrainResult:
    version: str
    data: LoggedData
    metrics: Mapping[str, float]
    lineage: Mapping[str, Any]


def user_bucket(user_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"retrain:{user_id}".encode()).digest()[:8], "big") % 100


def logged_data(
    joined: Iterable[JoinedRequest], tables: FeatureTables, locate: DistrictLocator
) -> LoggedData:
    """Arrays of impressed rows from complete joined requests (one assemble call for all)."""
    users: list[str] = []
    items: list[npt.NDArray[np.int64]] = []
    served: list[npt.NDArray[np.float64]] = []
    labels: list[npt.NDArray[np.int32]] = []
    positions: list[npt.NDArray[np.int16]] = []
    hours: list[int] = []
    points: list[tuple[float, float] | None] = []
    surfaces: list[str] = []
    for request in joined:  # one per logged request: gather, assemble once below
        if not request.complete or request.user_features is None:
            continue
        seen = np.flatnonzero(request.impressed)
        if seen.size == 0:
            continue
        users.append(request.user_id)
        items.append(request.sku_ids[seen])
        served.append(np.asarray(request.user_features, dtype=np.float64))
        labels.append(
            request.clicked[seen].astype(np.int32) + request.ordered[seen].astype(np.int32)
        )
        positions.append(seen.astype(np.int16))
        hours.append(request.hour)
        points.append(request.location)
        surfaces.append(request.surface)
    if not users:
        raise RetrainError("no complete joined request with impressions in the window")
    sizes = np.array([i.shape[0] for i in items], dtype=np.int64)
    user_rows = tables.user_rows(users)
    served_rows = np.vstack(served)
    home_lat, home_lon = user_row_home(served_rows)
    lat = np.array([p[0] if p else h for p, h in zip(points, home_lat, strict=True)])
    lon = np.array([p[1] if p else h for p, h in zip(points, home_lon, strict=True)])
    features = assemble_features(
        tables,
        np.repeat(np.maximum(user_rows, 0), sizes).astype(np.int32),
        np.concatenate(items),
        np.repeat(lat, sizes),
        np.repeat(lon, sizes),
        np.repeat(np.array(hours, dtype=np.int8), sizes),
        np.repeat(served_rows, sizes, axis=0),
    )
    return LoggedData(
        features=features,
        labels=np.concatenate(labels),
        group_sizes=sizes,
        position=np.concatenate(positions),
        group_bucket=np.array([user_bucket(u) for u in users], dtype=np.int64),
        group_district=locate(lat, lon),
        group_surface=np.array(surfaces),
        group_new_user=user_rows < 0,
    )


class _Hashing:
    """Passes items through while hashing a canonical form of each (the window's content)."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.count = 0

    def exposures(self, records: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
        for record in records:
            self.count += 1
            self.digest.update(f"{record.get('request_id')}|{record.get('ts')}\n".encode())
            yield record

    def events(self, events: Iterable[Any]) -> Iterable[Any]:
        for event in events:
            self.count += 1
            self.digest.update(
                f"{event.request_id}|{event.position}|{event.event}|{event.ts}\n".encode()
            )
            yield event


def _records(directory: Path, since: float, until: float) -> Iterable[dict[str, Any]]:
    for _path, _number, record in iter_exposure_lines(directory):
        ts = record.get("ts")
        if isinstance(ts, int | float) and since <= ts < until:
            yield record


def retrain(
    registry: ModelRegistry,
    name: str,
    *,
    exposures: Path,
    outcomes: Path,
    since: float,
    until: float,
    late_seconds: float = 600.0,
    params: RankerParams = RETRAIN_PARAMS,
    shuffle_labels: bool = False,
    warm_start: bool = True,
) -> RetrainResult:
    """Train ``name`` on the logged window and register it with its lineage (module docs)."""
    registry.check_registrable(name)
    if not exposures.is_dir():
        raise RetrainError(f"--exposures {exposures}: no such directory")
    if not outcomes.is_dir():
        raise RetrainError(f"--outcomes {outcomes}: no such directory")
    table, _ = registry.routing()
    route = table.models.get(name)
    parent = route.production if route else ""
    world, tables, features_version, world_version = registry.serving_inputs()
    exposure_hash, outcome_hash = _Hashing(), _Hashing()
    stats = JoinStats()
    joined = join_outcomes(
        exposure_hash.exposures(_records(exposures, since, until)),
        outcome_hash.events(iter_outcomes(outcomes, since, until + late_seconds)),
        late_seconds=late_seconds,
        now=time.time(),  # a request is complete once its late window has passed
        stats=stats,
    )
    data = logged_data(joined, tables, DistrictLocator(world.catalogue))
    learn_from = data  # held-out rows keep their true labels: the gates judge on the truth
    if shuffle_labels:
        shuffled = np.random.default_rng(params.seed).permutation(data.labels)
        learn_from = replace(data, labels=shuffled)
    held = data.group_bucket < HELDOUT_BUCKETS
    valid = (data.group_bucket >= HELDOUT_BUCKETS) & (
        data.group_bucket < HELDOUT_BUCKETS + VALIDATION_BUCKETS
    )
    train = ~held & ~valid
    window = {"since": since, "until": until}
    lineage: dict[str, Any] = {
        "source": "logged traffic (exposures x outcomes)",
        "parent_version": parent,
        "window": window,
        "exposures": {
            "directory": str(exposures),
            "records": exposure_hash.count,
            "sha256": exposure_hash.digest.hexdigest(),
        },
        "outcomes": {
            "directory": str(outcomes),
            "until": until + late_seconds,
            "events": outcome_hash.count,
            "sha256": outcome_hash.digest.hexdigest(),
        },
        "join": {
            "late_seconds": late_seconds,
            "requests_used": int(data.group_sizes.shape[0]),
            "rows_used": int(data.labels.shape[0]),
            **{k: int(v) for k, v in vars(stats).items() if isinstance(v, int)},
        },
        "split": {
            "train_requests": int(train.sum()),
            "validation_requests": int(valid.sum()),
            "heldout_requests": int(held.sum()),
        },
        "features_version": features_version,
        "world_version": world_version,
        "shuffled_labels": shuffle_labels,
        "warm_start_from": parent if warm_start else "",
    }
    data = replace(data, lineage={"window": f"[{since:.0f}, {until:.0f})"})
    try:
        trained = fit_ranker(
            learn_from.split(train),
            learn_from.split(valid),
            data.split(held),
            params,
            init_model=load_model_version(registry.root, name, parent).booster
            if warm_start and parent
            else None,
        )
    except ValueError as e:
        raise RetrainError(f"cannot retrain on the window: {e}") from e
    version = save_model_version(
        registry.root,
        name,
        trained,
        tables,
        features_version=features_version,
        world_version=world_version,
        params=params,
        lineage=lineage,
    )
    registry.validate(name, version)
    return RetrainResult(version, data, trained.metrics, lineage)
