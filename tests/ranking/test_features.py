from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.build import BuildReport
from recsys.geo import haversine_km
from recsys.ranking.features import (
    CATEGORICAL_FEATURES,
    FEATURE_INDEX,
    FEATURE_NAMES,
    FeatureTables,
    FeatureTablesError,
    assemble_features,
    build_feature_tables,
    load_feature_tables,
    save_feature_tables,
    user_feature_rows,
)
from recsys.world import CUISINES, World, load_world
from tests.ranking.conftest import PlantedWorld

Batch = tuple[
    npt.NDArray[np.int32],
    npt.NDArray[np.int64],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.int64],
]


def serving_batch(tables: FeatureTables, m: int, seed: int = 0) -> Batch:
    """Rows like serving sends: known and unknown users, with and without a location."""
    rng = np.random.default_rng(seed)
    users = rng.integers(-1, tables.n_users, m).astype(np.int32)
    items = rng.integers(0, tables.catalogue.n_items, m)
    lat = 52.52 + rng.normal(0, 0.03, m)
    lon = 13.40 + rng.normal(0, 0.05, m)
    no_location = rng.random(m) < 0.2
    lat[no_location] = np.nan
    lon[no_location] = np.nan
    hour = rng.integers(0, 24, m)
    return users, items, lat, lon, hour


def column(x: npt.NDArray[np.float32], name: str) -> npt.NDArray[np.float32]:
    return x[:, FEATURE_INDEX[name]]


def test_schema() -> None:
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    assert set(CATEGORICAL_FEATURES) <= set(FEATURE_NAMES)
    assert [FEATURE_NAMES[i] for i in FEATURE_INDEX.values()] == list(FEATURE_NAMES)


def test_features_of_known_users_follow_their_definitions(tables: FeatureTables) -> None:
    cat = tables.catalogue
    users = np.array([0, 5, 17], dtype=np.int32)
    items = np.array([3, 100, 2000])
    lat = np.array([52.50, 52.55, 52.52])
    lon = np.array([13.35, 13.42, 13.40])
    hour = np.array([0, 6, 19])
    x = assemble_features(tables, users, items, lat, lon, hour)
    assert x.shape == (3, len(FEATURE_NAMES))
    assert x.dtype == np.float32
    for i, (u, item) in enumerate(zip(users, items, strict=True)):
        r = cat.item_restaurant[item]
        c = cat.restaurant_cuisine[r]
        expected = {
            "mf_score": float(tables.user_vectors[u] @ tables.item_vectors[item]),
            "distance_km": float(
                haversine_km(lat[i], lon[i], cat.restaurant_lat[r], cat.restaurant_lon[r])
            ),
            "item_price": cat.item_price[item],
            "price_level": cat.restaurant_price_level[r],
            "rating": cat.restaurant_rating[r],
            "item_popularity": tables.item_popularity[item],
            "restaurant_popularity": tables.restaurant_popularity[r],
            "item_ctr": tables.item_ctr[item],
            "restaurant_ctr": tables.restaurant_ctr[r],
            "hour_sin": np.sin(2 * np.pi * hour[i] / 24),
            "hour_cos": np.cos(2 * np.pi * hour[i] / 24),
            "user_cuisine_affinity": tables.user_cuisine_affinity[u, c],
            "price_ratio": cat.item_price[item] / tables.user_price_mean[u],
            "user_activity": tables.user_activity[u],
            "cuisine": c,
            "category": cat.item_category[item],
        }
        assert set(expected) == set(FEATURE_NAMES)
        for name, value in expected.items():
            assert x[i, FEATURE_INDEX[name]] == pytest.approx(float(value), rel=1e-5, abs=1e-6), (
                name
            )


def test_unknown_users_get_population_defaults(tables: FeatureTables) -> None:
    items = np.array([10, 20, 30])
    x = assemble_features(
        tables,
        np.full(3, -1, dtype=np.int32),
        items,
        np.full(3, 52.52),
        np.full(3, 13.40),
        np.full(3, 12),
    )
    cuisine = tables.catalogue.restaurant_cuisine[tables.catalogue.item_restaurant[items]]
    np.testing.assert_array_equal(column(x, "mf_score"), 0.0)
    np.testing.assert_array_equal(column(x, "user_activity"), 0.0)
    np.testing.assert_allclose(
        column(x, "user_cuisine_affinity"), tables.population_cuisine_affinity[cuisine]
    )
    np.testing.assert_allclose(
        column(x, "price_ratio"),
        tables.catalogue.item_price[items] / tables.population_price_mean,
        rtol=1e-6,
    )
    assert np.isfinite(x).all()


def test_missing_location_uses_home_or_is_missing(tables: FeatureTables) -> None:
    users = np.array([7, -1], dtype=np.int32)
    items = np.array([50, 50])
    nan = np.full(2, np.nan)
    x = assemble_features(tables, users, items, nan, nan, np.array([12, 12]))
    home = assemble_features(
        tables,
        users[:1],
        items[:1],
        tables.user_home_lat[7:8],
        tables.user_home_lon[7:8],
        np.array([12]),
    )
    np.testing.assert_array_equal(x[0], home[0])
    assert np.isnan(column(x, "distance_km")[1])
    assert np.isfinite(np.delete(x[1], FEATURE_INDEX["distance_km"])).all()


def test_empty_batch(tables: FeatureTables) -> None:
    empty = np.zeros(0, dtype=np.int64)
    x = assemble_features(tables, empty, empty, empty * 1.0, empty * 1.0, empty)
    assert x.shape == (0, len(FEATURE_NAMES))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 299), min_size=1, max_size=60), st.integers(0, 3))
def test_rows_are_independent_of_the_batch(
    tables: FeatureTables, picks: list[int], seed: int
) -> None:
    """Serving scores any subset or order of candidates: a row's features never depend on it."""
    users, items, lat, lon, hour = serving_batch(tables, 300, seed)
    full = assemble_features(tables, users, items, lat, lon, hour)
    idx = np.array(picks)
    part = assemble_features(tables, users[idx], items[idx], lat[idx], lon[idx], hour[idx])
    np.testing.assert_array_equal(part, full[idx])


def test_training_rows_use_the_same_code_path(world: World, tables: FeatureTables) -> None:
    """A logged impression re-served as a candidate gets exactly its training features."""
    log = world.log
    rows = np.arange(0, log.n_rows, 997)
    logged = assemble_features(
        tables, log.user[rows], log.item[rows], log.lat[rows], log.lon[rows], log.hour[rows]
    )
    user_ids = world.users.user_ids[log.user[rows]].tolist()
    served = assemble_features(
        tables,
        tables.user_rows(user_ids),
        log.item[rows].astype(np.int64),
        log.lat[rows].astype(np.float64),
        log.lon[rows].astype(np.float64),
        log.hour[rows].astype(np.int64),
    )
    np.testing.assert_array_equal(served, logged)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lat": np.zeros(2)}, r"lat has shape \(2,\), expected \(3,\)"),
        ({"user_rows": np.array([0, 1, -2])}, r"user_rows must be in \[-1,"),
        ({"items": np.array([0, 1, 10**7])}, r"items must be sku ids in \[0,"),
        ({"hour": np.array([0, 12, 24])}, "hour must be in 0..23"),
        ({"items": np.zeros((3, 1), dtype=np.int64)}, "items has shape"),
    ],
)
def test_rejects_bad_inputs(
    tables: FeatureTables, change: dict[str, npt.NDArray[np.generic]], message: str
) -> None:
    args: dict[str, npt.NDArray[np.generic]] = {
        "user_rows": np.array([0, 1, 2]),
        "items": np.array([0, 1, 2]),
        "lat": np.full(3, 52.5),
        "lon": np.full(3, 13.4),
        "hour": np.array([1, 2, 3]),
        **change,
    }
    with pytest.raises(ValueError, match=message):
        assemble_features(tables, **args)  # type: ignore[arg-type]


def test_user_rows(tables: FeatureTables) -> None:
    ids = [str(tables.user_ids[3]), "nobody", str(tables.user_ids[0])]
    rows = tables.user_rows(ids)
    assert rows.dtype == np.int32
    assert rows.tolist() == [3, -1, 0]
    assert tables.user_rows([]).shape == (0,)


def test_tables_are_sane(tables: FeatureTables) -> None:
    assert tables.user_cuisine_affinity.shape == (tables.n_users, len(CUISINES))
    np.testing.assert_allclose(tables.user_cuisine_affinity.sum(axis=1), 1.0, rtol=1e-5)
    assert tables.population_cuisine_affinity.sum() == pytest.approx(1.0, rel=1e-5)
    for name in ("item_ctr", "restaurant_ctr"):
        values = getattr(tables, name)
        assert ((values > 0) & (values < 1)).all(), name
    assert (tables.user_price_mean > 0).all()
    assert (tables.item_popularity >= 0).all()


def test_tables_see_only_the_history_window(planted: PlantedWorld, tables: FeatureTables) -> None:
    """Recent outcomes (the ranker's labels) must not leak into the features."""
    world = planted.world
    recent = ~world.history_mask()
    flipped_clicks = np.where(recent, ~world.log.clicked, world.log.clicked)
    flipped_orders = np.where(recent, flipped_clicks, world.log.ordered)
    log = replace(world.log, clicked=flipped_clicks, ordered=flipped_orders)
    other = build_feature_tables(
        replace(world, log=log), planted.user_vectors, planted.item_vectors
    )
    for name in ("item_popularity", "item_ctr", "user_cuisine_affinity", "user_price_mean"):
        np.testing.assert_array_equal(getattr(other, name), getattr(tables, name))
    assert other.population_price_mean == tables.population_price_mean


@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_round_trip(tables: FeatureTables, tmp_path: Path, mmap: bool) -> None:
    save_feature_tables(tables, tmp_path)
    loaded = load_feature_tables(tmp_path, tables.catalogue, mmap=mmap)
    # Mapped (a plain ndarray view of the mapping), or read into memory.
    assert type(loaded.item_vectors) is np.ndarray
    assert isinstance(loaded.item_vectors.base, np.memmap) == mmap
    assert loaded.population_price_mean == tables.population_price_mean
    batch = serving_batch(tables, 500)
    np.testing.assert_array_equal(
        assemble_features(loaded, *batch), assemble_features(tables, *batch)
    )
    assert loaded.user_rows([str(tables.user_ids[9])]).tolist() == [9]


def test_load_refuses_missing_or_mismatched_tables(
    world: World, tables: FeatureTables, tmp_path: Path
) -> None:
    save_feature_tables(tables, tmp_path)
    smaller = replace(
        world.catalogue,
        item_restaurant=world.catalogue.item_restaurant[:-1],
        item_category=world.catalogue.item_category[:-1],
        item_price=world.catalogue.item_price[:-1],
        item_available=world.catalogue.item_available[:-1],
    )
    with pytest.raises(FeatureTablesError, match="'item_popularity' has shape"):
        load_feature_tables(tmp_path, smaller)
    (tmp_path / "item_ctr.npy").unlink()
    with pytest.raises(FeatureTablesError, match=r"item_ctr\.npy: missing feature table"):
        load_feature_tables(tmp_path, world.catalogue)


def test_vector_dimensions_must_agree(planted: PlantedWorld) -> None:
    with pytest.raises(
        FeatureTablesError, match="user_vectors have dimension 8 but item_vectors 4"
    ):
        build_feature_tables(planted.world, planted.user_vectors, planted.item_vectors[:, :4])
    with pytest.raises(FeatureTablesError, match="expected"):
        build_feature_tables(planted.world, planted.user_vectors[:-1], planted.item_vectors)


def test_user_feature_rows_give_the_same_features_as_the_tables(
    built_world: tuple[Path, BuildReport],
) -> None:
    """The online feature store serves user_feature_rows; ranking must not see a difference."""
    root, report = built_world
    catalogue = load_world(root / "world" / report.world_version).catalogue
    tables = load_feature_tables(root / "features" / report.features_version, catalogue)
    rng = np.random.default_rng(0)
    m = 3_000
    rows = rng.integers(-1, tables.n_users, m).astype(np.int32)
    items = rng.integers(0, catalogue.n_items, m)
    lat = np.where(rng.random(m) < 0.5, np.nan, 52.5)
    lon = np.where(np.isnan(lat), np.nan, 13.4)
    hour = rng.integers(0, 24, m)
    from_tables = assemble_features(tables, rows, items, lat, lon, hour)
    served = user_feature_rows(tables, np.maximum(rows, 0))
    from_rows = assemble_features(tables, rows, items, lat, lon, hour, served)
    np.testing.assert_array_equal(from_rows, from_tables)
    with pytest.raises(ValueError, match="user_rows_features has shape"):
        assemble_features(tables, rows, items, lat, lon, hour, served[:-1])
