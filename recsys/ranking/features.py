"""Ranking features: one code path for training rows and serving candidates.

Training calls :func:`assemble_features` on logged impressions; serving calls it on a batch of
requests x retrieval candidates. Both read the same :class:`FeatureTables`, which are computed
from the *history* window of the log only (see ``recsys.world.HISTORY_FRACTION``), so a recent
impression used as a training row never sees its own outcome.

Unknown users (row ``-1``) get a zero user vector, the population cuisine affinity, the
population price mean and zero activity: the model still ranks their candidates by distance,
quality and popularity. A request without a location passes ``NaN`` latitude/longitude: a known
user's home is used instead; for an unknown user the distance is missing (``NaN``), the same for
every candidate of the request, so it cannot reorder them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from recsys.geo import haversine_km
from recsys.world import CATEGORIES, CUISINES, Catalogue, World, load_column

FEATURE_NAMES: tuple[str, ...] = (
    "mf_score",  # user . item, the retrieval score
    "distance_km",  # delivery address to restaurant
    "item_price",
    "price_level",  # restaurant price level 1..4
    "rating",  # restaurant rating
    "item_popularity",  # log1p weighted history clicks and orders of the item
    "restaurant_popularity",
    "item_ctr",  # smoothed history click-through rate, shrunk to the restaurant's
    "restaurant_ctr",  # smoothed towards the global rate
    "hour_sin",  # local hour of day on the unit circle
    "hour_cos",
    "user_cuisine_affinity",  # user's smoothed click share of the item's cuisine
    "price_ratio",  # item price / user's mean clicked price
    "user_activity",  # log1p of the user's history clicks
    "cuisine",  # index into CUISINES
    "category",  # index into CATEGORIES
)
CATEGORICAL_FEATURES: tuple[str, ...] = ("cuisine", "category")
FEATURE_INDEX: dict[str, int] = {name: i for i, name in enumerate(FEATURE_NAMES)}
CATEGORY_COUNTS: dict[str, int] = {"cuisine": len(CUISINES), "category": len(CATEGORIES)}
"""How many values each categorical feature takes (codes 0..count-1)."""

CLICK_WEIGHT = 1.0
ORDER_WEIGHT = 2.0
"""An order counts as its click plus two more in popularity and affinity."""
AFFINITY_PRIOR_CLICKS = 5.0
PRICE_PRIOR_CLICKS = 3.0
CTR_PRIOR_IMPRESSIONS = 20.0

_TABLE_ARRAYS = (
    "user_ids",
    "user_vectors",
    "item_vectors",
    "user_home_lat",
    "user_home_lon",
    "item_popularity",
    "restaurant_popularity",
    "item_ctr",
    "restaurant_ctr",
    "user_cuisine_affinity",
    "user_price_mean",
    "user_activity",
    "population_cuisine_affinity",
    "population_price_mean",
)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


class FeatureTablesError(ValueError):
    """Feature tables are missing, or their shapes do not fit each other or the catalogue."""


@dataclass(frozen=True, eq=False)
class FeatureTables:
    """Everything :func:`assemble_features` reads besides the request: immutable, shareable."""

    catalogue: Catalogue
    user_ids: npt.NDArray[np.str_]  # [U]
    user_vectors: F32  # [U, d]
    item_vectors: F32  # [N, d]
    user_home_lat: F64  # [U]
    user_home_lon: F64  # [U]
    item_popularity: F32  # [N]
    restaurant_popularity: F32  # [R]
    item_ctr: F32  # [N]
    restaurant_ctr: F32  # [R]
    user_cuisine_affinity: F32  # [U, len(CUISINES)]
    user_price_mean: F32  # [U]
    user_activity: F32  # [U]
    population_cuisine_affinity: F32  # [len(CUISINES)], what an unknown user gets
    population_price_mean: float
    _row_of_user: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_shapes(self)
        rows = {user_id: row for row, user_id in enumerate(self.user_ids.tolist())}
        object.__setattr__(self, "_row_of_user", rows)

    @property
    def n_users(self) -> int:
        return int(self.user_ids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.item_vectors.shape[1])

    def user_rows(self, user_ids: Sequence[str]) -> npt.NDArray[np.int32]:
        """Row of each user id, ``-1`` for users the tables do not know."""
        get = self._row_of_user.get
        return np.fromiter((get(u, -1) for u in user_ids), dtype=np.int32, count=len(user_ids))


def user_row_width(dim: int) -> int:
    """Columns of a user's feature row: vector, cuisine affinity, price mean, activity, home."""
    return dim + len(CUISINES) + 4


def user_feature_rows(tables: FeatureTables, rows: npt.NDArray[np.integer[Any]]) -> F64:
    """Every per-user input of :func:`assemble_features` for ``rows`` (>= 0), one float64 row
    each (float64 holds the float32 columns exactly): what the online feature store serves."""
    d, c = tables.dim, len(CUISINES)
    out = np.empty((rows.shape[0], user_row_width(d)), dtype=np.float64)
    out[:, :d] = tables.user_vectors[rows]
    out[:, d : d + c] = tables.user_cuisine_affinity[rows]
    out[:, d + c] = tables.user_price_mean[rows]
    out[:, d + c + 1] = tables.user_activity[rows]
    out[:, d + c + 2] = tables.user_home_lat[rows]
    out[:, d + c + 3] = tables.user_home_lon[rows]
    return out


def user_row_home(rows: F64) -> tuple[F64, F64]:
    """Home latitude and longitude columns of user feature rows (the last two)."""
    return rows[:, -2], rows[:, -1]


def _check_shapes(t: FeatureTables) -> None:
    n_users = t.user_ids.shape[0]
    n_items = t.catalogue.n_items
    n_restaurants = t.catalogue.n_restaurants
    expected: dict[str, tuple[int, ...]] = {
        "user_ids": (n_users,),
        "user_home_lat": (n_users,),
        "user_home_lon": (n_users,),
        "item_popularity": (n_items,),
        "restaurant_popularity": (n_restaurants,),
        "item_ctr": (n_items,),
        "restaurant_ctr": (n_restaurants,),
        "user_cuisine_affinity": (n_users, len(CUISINES)),
        "user_price_mean": (n_users,),
        "user_activity": (n_users,),
        "population_cuisine_affinity": (len(CUISINES),),
    }
    for name, shape in expected.items():
        actual = getattr(t, name).shape
        if actual != shape:
            raise FeatureTablesError(f"feature table {name!r} has shape {actual}, expected {shape}")
    uv, iv = t.user_vectors, t.item_vectors
    if uv.ndim != 2 or iv.ndim != 2 or uv.shape[0] != n_users or iv.shape[0] != n_items:
        raise FeatureTablesError(
            f"user_vectors {uv.shape} and item_vectors {iv.shape}: expected "
            f"({n_users}, d) and ({n_items}, d)"
        )
    if uv.shape[1] != iv.shape[1]:
        raise FeatureTablesError(
            f"user_vectors have dimension {uv.shape[1]} but item_vectors {iv.shape[1]}"
        )


def build_feature_tables(
    world: World,
    user_vectors: npt.NDArray[np.floating[Any]],
    item_vectors: npt.NDArray[np.floating[Any]],
) -> FeatureTables:
    """Aggregate the history window of ``world.log`` into the tables features are read from."""
    cat = world.catalogue
    n_users, n_items, n_restaurants = world.users.n_users, cat.n_items, cat.n_restaurants
    n_cuisines = len(CUISINES)
    history = world.history_mask()
    user = world.log.user[history].astype(np.int64)
    item = world.log.item[history].astype(np.int64)
    clicked = world.log.clicked[history].astype(np.float64)
    ordered = world.log.ordered[history].astype(np.float64)
    weight = CLICK_WEIGHT * clicked + ORDER_WEIGHT * ordered
    item_restaurant = cat.item_restaurant.astype(np.int64)

    item_weight = np.bincount(item, weights=weight, minlength=n_items)
    restaurant_weight = np.bincount(item_restaurant, weights=item_weight, minlength=n_restaurants)

    impressions = np.bincount(item, minlength=n_items).astype(np.float64)
    clicks = np.bincount(item, weights=clicked, minlength=n_items)
    restaurant_impressions = np.bincount(
        item_restaurant, weights=impressions, minlength=n_restaurants
    )
    restaurant_clicks = np.bincount(item_restaurant, weights=clicks, minlength=n_restaurants)
    global_ctr = clicks.sum() / max(impressions.sum(), 1.0)
    prior = CTR_PRIOR_IMPRESSIONS
    restaurant_ctr = (restaurant_clicks + prior * global_ctr) / (restaurant_impressions + prior)
    item_ctr = (clicks + prior * restaurant_ctr[item_restaurant]) / (impressions + prior)

    cuisine = cat.restaurant_cuisine[item_restaurant[item]].astype(np.int64)
    cuisine_clicks = np.bincount(
        user * n_cuisines + cuisine, weights=clicked + ordered, minlength=n_users * n_cuisines
    ).reshape(n_users, n_cuisines)
    total = cuisine_clicks.sum()
    population_affinity = (
        cuisine_clicks.sum(axis=0) / total if total > 0 else np.full(n_cuisines, 1.0 / n_cuisines)
    )
    affinity = (cuisine_clicks + AFFINITY_PRIOR_CLICKS * population_affinity) / (
        cuisine_clicks.sum(axis=1, keepdims=True) + AFFINITY_PRIOR_CLICKS
    )

    user_clicks = np.bincount(user, weights=clicked, minlength=n_users)
    clicked_price = cat.item_price[item].astype(np.float64) * clicked
    population_price = (
        clicked_price.sum() / clicked.sum()
        if clicked.sum() > 0
        else float(cat.item_price.astype(np.float64).mean())
    )
    price_mean = (
        np.bincount(user, weights=clicked_price, minlength=n_users)
        + PRICE_PRIOR_CLICKS * population_price
    ) / (user_clicks + PRICE_PRIOR_CLICKS)

    def f32(a: npt.NDArray[Any]) -> F32:
        return np.ascontiguousarray(a, dtype=np.float32)

    return FeatureTables(
        catalogue=cat,
        user_ids=np.asarray(world.users.user_ids),
        user_vectors=f32(user_vectors),
        item_vectors=f32(item_vectors),
        user_home_lat=np.asarray(world.users.home_lat, dtype=np.float64),
        user_home_lon=np.asarray(world.users.home_lon, dtype=np.float64),
        item_popularity=f32(np.log1p(item_weight)),
        restaurant_popularity=f32(np.log1p(restaurant_weight)),
        item_ctr=f32(item_ctr),
        restaurant_ctr=f32(restaurant_ctr),
        user_cuisine_affinity=f32(affinity),
        user_price_mean=f32(price_mean),
        user_activity=f32(np.log1p(user_clicks)),
        population_cuisine_affinity=f32(population_affinity),
        population_price_mean=float(population_price),
    )


def save_feature_tables(tables: FeatureTables, directory: Path) -> None:
    """Write one ``<name>.npy`` per table (the catalogue is saved with the world)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in _TABLE_ARRAYS:
        np.save(directory / f"{name}.npy", np.asarray(getattr(tables, name)), allow_pickle=False)


def load_feature_tables(
    directory: Path, catalogue: Catalogue, *, mmap: bool = True
) -> FeatureTables:
    """Load tables saved by :func:`save_feature_tables`, memory-mapped by default.

    Raises :class:`FeatureTablesError` if a table is missing or does not fit ``catalogue``.
    """
    arrays: dict[str, Any] = {}
    for name in _TABLE_ARRAYS:
        path = directory / f"{name}.npy"
        try:
            arrays[name] = load_column(path, mmap=mmap)
        except FileNotFoundError as e:
            raise FeatureTablesError(f"{path}: missing feature table {name!r}") from e
    arrays["population_price_mean"] = float(arrays["population_price_mean"])
    return FeatureTables(catalogue=catalogue, **arrays)


def _check_rows(name: str, values: npt.NDArray[Any], m: int) -> None:
    if values.ndim != 1 or values.shape[0] != m:
        raise ValueError(f"{name} has shape {values.shape}, expected ({m},) like items")


def assemble_features(
    tables: FeatureTables,
    user_rows: npt.NDArray[np.integer[Any]],
    items: npt.NDArray[np.integer[Any]],
    lat: npt.NDArray[np.floating[Any]],
    lon: npt.NDArray[np.floating[Any]],
    hour: npt.NDArray[np.integer[Any]],
    user_rows_features: F64 | None = None,
) -> F32:
    """The ``[M, len(FEATURE_NAMES)]`` float32 feature matrix of M (user, item, context) rows.

    ``user_rows_features`` ([M, user_row_width(d)], see :func:`user_feature_rows`) supplies the
    per-user inputs from elsewhere (the online feature store); by default they come from
    ``tables``. Both give the same features for the same values.

    ``user_rows`` come from :meth:`FeatureTables.user_rows` (``-1``: unknown user); ``items``
    are sku ids; ``lat``/``lon`` the delivery address in degrees (``NaN``: none given);
    ``hour`` the local hour 0-23. Rows are independent: a row's features do not depend on the
    other rows of the batch.
    """
    items = np.asarray(items)
    if items.ndim != 1:
        raise ValueError(f"items has shape {items.shape}, expected a 1-D array of sku ids")
    m = int(items.shape[0])
    user_rows, lat, lon, hour = (np.asarray(a) for a in (user_rows, lat, lon, hour))
    for name, values in (("user_rows", user_rows), ("lat", lat), ("lon", lon), ("hour", hour)):
        _check_rows(name, values, m)
    out = np.empty((m, len(FEATURE_NAMES)), dtype=np.float32)
    if m == 0:
        return out
    n_items = tables.catalogue.n_items
    if int(items.min()) < 0 or int(items.max()) >= n_items:
        raise ValueError(
            f"items must be sku ids in [0, {n_items}), got {items.min()}..{items.max()}"
        )
    if int(user_rows.min()) < -1 or int(user_rows.max()) >= tables.n_users:
        raise ValueError(
            f"user_rows must be in [-1, {tables.n_users}), got {user_rows.min()}..{user_rows.max()}"
        )
    if int(hour.min()) < 0 or int(hour.max()) > 23:
        raise ValueError(f"hour must be in 0..23, got {hour.min()}..{hour.max()}")

    cat = tables.catalogue
    col = FEATURE_INDEX
    known = user_rows >= 0
    row = np.where(known, user_rows, 0)
    restaurant = cat.item_restaurant[items]
    user = _UserColumns.of(tables, row, user_rows_features)

    # np.take, not fancy indexing: 2-3x faster for row gathers from a 2-D table.
    mf = np.einsum("ij,ij->i", user.vectors, np.take(tables.item_vectors, items, axis=0))
    out[:, col["mf_score"]] = np.where(known, mf, 0.0)

    lat = lat.astype(np.float64, copy=False)
    lon = lon.astype(np.float64, copy=False)
    no_location = np.isnan(lat) | np.isnan(lon)
    if no_location.any():
        lat = np.where(no_location & known, user.home_lat, lat)
        lon = np.where(no_location & known, user.home_lon, lon)
    out[:, col["distance_km"]] = haversine_km(
        lat, lon, cat.restaurant_lat[restaurant], cat.restaurant_lon[restaurant]
    )

    price = cat.item_price[items]
    out[:, col["item_price"]] = price
    out[:, col["price_level"]] = cat.restaurant_price_level[restaurant]
    out[:, col["rating"]] = cat.restaurant_rating[restaurant]
    out[:, col["item_popularity"]] = tables.item_popularity[items]
    out[:, col["restaurant_popularity"]] = tables.restaurant_popularity[restaurant]
    out[:, col["item_ctr"]] = tables.item_ctr[items]
    out[:, col["restaurant_ctr"]] = tables.restaurant_ctr[restaurant]

    angle = hour.astype(np.float64) * (2.0 * np.pi / 24.0)
    out[:, col["hour_sin"]] = np.sin(angle)
    out[:, col["hour_cos"]] = np.cos(angle)

    cuisine = cat.restaurant_cuisine[restaurant]
    out[:, col["user_cuisine_affinity"]] = np.where(
        known,
        user.affinity(cuisine),
        tables.population_cuisine_affinity[cuisine],
    )
    price_mean = np.where(known, user.price_mean, tables.population_price_mean)
    out[:, col["price_ratio"]] = price / price_mean
    out[:, col["user_activity"]] = np.where(known, user.activity, 0.0)
    out[:, col["cuisine"]] = cuisine
    out[:, col["category"]] = cat.item_category[items]
    return out


@dataclass(frozen=True)
class _UserColumns:
    """The per-user inputs of M feature rows, from the tables or from user feature rows."""

    vectors: F32
    price_mean: F32
    activity: F32
    home_lat: F64
    home_lon: F64
    _affinity: F32
    _by_row: bool
    """True: ``_affinity`` is [M, C] (one row per feature row); False: the [U, C] table."""
    _row: npt.NDArray[np.integer[Any]]

    def affinity(self, cuisine: npt.NDArray[np.integer[Any]]) -> F32:
        rows = np.arange(cuisine.shape[0]) if self._by_row else self._row
        return np.asarray(self._affinity[rows, cuisine], dtype=np.float32)

    @classmethod
    def of(
        cls, tables: FeatureTables, row: npt.NDArray[np.integer[Any]], rows_features: F64 | None
    ) -> _UserColumns:
        if rows_features is None:
            return cls(
                np.take(tables.user_vectors, row, axis=0),
                tables.user_price_mean[row],
                tables.user_activity[row],
                tables.user_home_lat[row],
                tables.user_home_lon[row],
                tables.user_cuisine_affinity,
                False,
                row,
            )
        d, c = tables.dim, len(CUISINES)
        if rows_features.shape != (row.shape[0], user_row_width(d)):
            raise ValueError(
                f"user_rows_features has shape {rows_features.shape}, expected "
                f"({row.shape[0]}, {user_row_width(d)}): one user row per feature row"
            )
        # The float32 columns are cast back before use, so the arithmetic is the tables' own.
        return cls(
            rows_features[:, :d].astype(np.float32),
            rows_features[:, d + c].astype(np.float32),
            rows_features[:, d + c + 1].astype(np.float32),
            *user_row_home(rows_features),
            rows_features[:, d : d + c].astype(np.float32),
            True,
            row,
        )


def feature_types() -> dict[str, str]:
    """Name -> ``"categorical"`` or ``"numeric"``, for manifests and drift monitors."""
    return {
        name: "categorical" if name in CATEGORICAL_FEATURES else "numeric" for name in FEATURE_NAMES
    }
