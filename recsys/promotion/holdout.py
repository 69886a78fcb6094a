"""Held-out sessions both models are judged on, with the slices a gate reads.

An :class:`EvalSet` is rows of ranker features with labels (2 ordered, 1 clicked, 0 shown) in
contiguous query groups (one served list or one logged session each), and per group the slices:
the district of the delivery point, the surface, and whether the user is new (no history before
the window). :func:`world_holdout` builds it from the world behind the served index (the users
``World.heldout_user_mask`` keeps out of training); retraining builds it from logged, joined
traffic (promotion/retrain.py). Both models score the same rows, so the comparison is paired.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.spatial import cKDTree

from recsys.ranking.features import FeatureTables
from recsys.ranking.training import RankerParams, training_splits
from recsys.world import Catalogue, World


@dataclass(frozen=True)
class EvalSet:
    features: npt.NDArray[np.float32]
    labels: npt.NDArray[np.int32]
    group_sizes: npt.NDArray[np.int64]
    district: npt.NDArray[np.str_]
    """[groups] e.g. ``d3``."""
    surface: npt.NDArray[np.str_]
    """[groups] e.g. ``home``."""
    new_user: npt.NDArray[np.bool_]
    """[groups] the user had no session before the window."""
    description: str
    """What the rows are (for the report): source, window, counts."""
    content_hash: str = ""

    @property
    def groups(self) -> int:
        return int(self.group_sizes.shape[0])

    def slices(self) -> dict[str, npt.NDArray[np.bool_]]:
        """Slice name -> mask over groups: overall, each district, each surface, new/returning."""
        out = {"overall": np.ones(self.groups, dtype=bool)}
        for key, values in (("district", self.district), ("surface", self.surface)):
            for value in np.unique(values).tolist():
                out[f"{key}:{value}"] = values == value
        out["users:new"] = self.new_user.copy()
        out["users:returning"] = ~self.new_user
        return out


class DistrictLocator:
    """The district of a delivery point: that of the nearest restaurant (one KD-tree query for
    all points; longitudes scaled by the cosine of the mean latitude)."""

    def __init__(self, catalogue: Catalogue) -> None:
        self._cos = float(np.cos(np.radians(np.mean(catalogue.restaurant_lat))))
        self._tree = cKDTree(
            np.column_stack(
                [catalogue.restaurant_lat, np.asarray(catalogue.restaurant_lon) * self._cos]
            )
        )
        self._district = np.asarray(catalogue.restaurant_district)

    def __call__(self, lat: npt.ArrayLike, lon: npt.ArrayLike) -> npt.NDArray[np.str_]:
        points = np.column_stack(
            [np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64) * self._cos]
        )
        if points.shape[0] == 0:
            return np.zeros(0, dtype="<U8")
        _, nearest = self._tree.query(points)
        return np.char.add("d", self._district[nearest].astype(str))


def world_holdout(
    world: World, tables: FeatureTables, params: RankerParams | None = None
) -> EvalSet:
    """The held-out users' sessions of the world's recent window, as training evaluates them."""
    params = params or RankerParams()
    held_out = training_splits(world, tables, params)["eval"]
    log = world.log
    history = world.history_mask()
    recent = np.flatnonzero(~history)
    user = log.user[recent]
    rows = recent[world.heldout_user_mask()[user]]  # the eval split's rows, in order
    starts = np.cumsum(held_out.group_sizes) - held_out.group_sizes
    first = rows[starts]
    seen_before = np.bincount(log.user[history], minlength=world.users.n_users) > 0
    locate = DistrictLocator(world.catalogue)
    return EvalSet(
        features=held_out.features,
        labels=held_out.labels,
        group_sizes=held_out.group_sizes,
        district=locate(log.lat[first], log.lon[first]),
        surface=np.full(first.shape[0], "home"),
        new_user=~seen_before[log.user[first]],
        description=(
            f"the world's held-out users, recent window: {held_out.group_sizes.shape[0]:,} "
            f"sessions, {held_out.rows:,} rows"
        ),
        content_hash=fingerprint(held_out.features, held_out.labels, held_out.group_sizes),
    )


def fingerprint(*arrays: npt.NDArray[Any]) -> str:
    """sha256 over arrays' dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()


def describe(eval_set: EvalSet) -> dict[str, Any]:
    return {
        "description": eval_set.description,
        "groups": eval_set.groups,
        "rows": int(eval_set.labels.shape[0]),
        "content_hash": eval_set.content_hash,
    }
