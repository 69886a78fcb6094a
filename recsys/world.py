"""The demo world's data: catalogue, users and interaction log, as columnar numpy arrays.

Identifiers are row indices: ``sku_id`` is the item's row, ``restaurant_id`` the restaurant's
row, and a user's row is found through ``Users.user_ids`` (strings, as requests carry them).
The generator lives in recsys/worldgen.py; this module is the schema every stage reads, and
how it is saved (one ``.npy`` per column, memory-mapped on load, no pickles).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

CUISINES: tuple[str, ...] = (
    "pizza", "burgers", "sushi", "indian", "thai", "chinese", "mexican", "italian",
    "vietnamese", "korean", "turkish", "greek", "vegan", "salads", "desserts", "breakfast",
)  # fmt: skip
CATEGORIES: tuple[str, ...] = ("main", "starter", "side", "drink", "dessert")

HISTORY_FRACTION = 0.75
"""The first 75% of days are history (vectors, popularity, affinities); the rest is recent
(ranker training and evaluation). Features for a recent impression only ever see history."""

HELDOUT_USER_MODULUS = 10
"""Users whose row % 10 == 0 are held out of ranker training and used for offline metrics."""


@dataclass(frozen=True)
class Catalogue:
    restaurant_lat: npt.NDArray[np.float64]  # [R] degrees
    restaurant_lon: npt.NDArray[np.float64]  # [R] degrees
    restaurant_cuisine: npt.NDArray[np.int16]  # [R] index into CUISINES
    restaurant_price_level: npt.NDArray[np.int8]  # [R] 1..4
    restaurant_rating: npt.NDArray[np.float32]  # [R] 1.0..5.0
    restaurant_is_open: npt.NDArray[np.bool_]  # [R]
    restaurant_district: npt.NDArray[np.int16]  # [R]
    item_restaurant: npt.NDArray[np.int32]  # [N] restaurant row of each SKU
    item_category: npt.NDArray[np.int8]  # [N] index into CATEGORIES
    item_price: npt.NDArray[np.float32]  # [N] currency units
    item_available: npt.NDArray[np.bool_]  # [N] not sold out

    @property
    def n_restaurants(self) -> int:
        return int(self.restaurant_lat.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.item_restaurant.shape[0])


@dataclass(frozen=True)
class Users:
    user_ids: npt.NDArray[np.str_]  # [U] e.g. "user-0000042"
    home_lat: npt.NDArray[np.float64]  # [U]
    home_lon: npt.NDArray[np.float64]  # [U]

    @property
    def n_users(self) -> int:
        return int(self.user_ids.shape[0])


@dataclass(frozen=True)
class InteractionLog:
    """One row per impression, grouped by session (a session's rows are contiguous)."""

    session: npt.NDArray[np.int32]  # [M] session id, non-decreasing
    user: npt.NDArray[np.int32]  # [M] user row
    item: npt.NDArray[np.int32]  # [M] sku id
    day: npt.NDArray[np.int16]  # [M] 0..n_days-1
    hour: npt.NDArray[np.int8]  # [M] 0..23 local time
    lat: npt.NDArray[np.float32]  # [M] delivery address of the session
    lon: npt.NDArray[np.float32]  # [M]
    position: npt.NDArray[np.int16]  # [M] slot in the feed shown
    clicked: npt.NDArray[np.bool_]  # [M]
    ordered: npt.NDArray[np.bool_]  # [M] implies clicked

    @property
    def n_rows(self) -> int:
        return int(self.session.shape[0])


@dataclass(frozen=True)
class WorldMeta:
    seed: int
    n_skus: int
    n_users: int
    n_days: int
    center_lat: float
    center_lon: float
    n_districts: int


@dataclass(frozen=True)
class World:
    catalogue: Catalogue
    users: Users
    log: InteractionLog
    meta: WorldMeta

    def history_mask(self) -> npt.NDArray[np.bool_]:
        """Log rows in the history window (see HISTORY_FRACTION)."""
        return self.log.day < self.history_days

    @property
    def history_days(self) -> int:
        return max(1, round(self.meta.n_days * HISTORY_FRACTION))

    def heldout_user_mask(self) -> npt.NDArray[np.bool_]:
        """[U] users kept out of ranker training, for offline evaluation."""
        return np.asarray(np.arange(self.users.n_users) % HELDOUT_USER_MODULUS == 0)


_PARTS: dict[str, type[Catalogue] | type[Users] | type[InteractionLog]] = {
    "catalogue": Catalogue,
    "users": Users,
    "log": InteractionLog,
}


def save_world(world: World, directory: Path) -> None:
    """Write one ``<part>.<column>.npy`` per column and ``world.json`` with the metadata."""
    directory.mkdir(parents=True, exist_ok=True)
    for part in _PARTS:
        value = getattr(world, part)
        for f in fields(value):
            np.save(directory / f"{part}.{f.name}.npy", getattr(value, f.name), allow_pickle=False)
    (directory / "world.json").write_text(json.dumps(asdict(world.meta), indent=2) + "\n")


def load_column(path: Path, *, mmap: bool = True) -> npt.NDArray[Any]:
    """One saved array; with ``mmap``, memory-mapped read-only and returned as a plain ndarray
    view of the mapping. The view shares the mapping (pages stay shared between processes)
    without the ``np.memmap`` subclass, whose Python-level ``__getitem__`` and
    ``__array_finalize__`` every fancy index on the request path would otherwise pay."""
    if not mmap:
        return np.asarray(np.load(path, allow_pickle=False))
    return np.asarray(np.load(path, mmap_mode="r", allow_pickle=False))


def load_world(directory: Path, *, mmap: bool = True) -> World:
    """Load a world saved by :func:`save_world`; columns are memory-mapped by default."""
    parts: dict[str, Any] = {}
    for part, cls in _PARTS.items():
        columns = {
            f.name: load_column(directory / f"{part}.{f.name}.npy", mmap=mmap) for f in fields(cls)
        }
        parts[part] = cls(**columns)
    meta = WorldMeta(**json.loads((directory / "world.json").read_text()))
    return World(meta=meta, **parts)
