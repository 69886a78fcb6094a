"""A small synthetic world with planted, learnable signal, and a ranker trained on it once.

Clicks follow a logistic model of a hidden user-item dot product, distance, rating, price
sensitivity and position, so a ranker that combines them must beat ordering by popularity or by
the (noisy) user . item score alone. The "learned" vectors are the hidden ones plus noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest

from recsys.ranking.features import FeatureTables, build_feature_tables
from recsys.ranking.training import RankerParams, TrainedRanker, train_ranker
from recsys.world import (
    CATEGORIES,
    CUISINES,
    Catalogue,
    InteractionLog,
    Users,
    World,
    WorldMeta,
)

CENTER = (52.52, 13.40)
KM_PER_DEGREE_LAT = 111.0

SMALL_PARAMS = RankerParams(
    num_trees=80,
    learning_rate=0.1,
    num_leaves=15,
    min_data_in_leaf=20,
    early_stopping_rounds=15,
    seed=3,
)


@dataclass(frozen=True)
class PlantedWorld:
    world: World
    user_vectors: npt.NDArray[np.float32]
    item_vectors: npt.NDArray[np.float32]


def make_world(
    seed: int = 0,
    *,
    n_restaurants: int = 150,
    n_users: int = 800,
    sessions_per_user: int = 12,
    n_days: int = 20,
    impressions: int = 20,
    dim: int = 8,
) -> PlantedWorld:
    rng = np.random.default_rng(seed)
    n_districts = 5
    district_lat = CENTER[0] + rng.normal(0, 0.04, n_districts)
    district_lon = CENTER[1] + rng.normal(0, 0.06, n_districts)

    r_district = rng.integers(0, n_districts, n_restaurants).astype(np.int16)
    r_lat = district_lat[r_district] + rng.normal(0, 0.012, n_restaurants)
    r_lon = district_lon[r_district] + rng.normal(0, 0.018, n_restaurants)
    cuisine_share = rng.dirichlet(np.ones(len(CUISINES)))
    r_cuisine = rng.choice(len(CUISINES), n_restaurants, p=cuisine_share).astype(np.int16)
    r_price_level = rng.integers(1, 5, n_restaurants).astype(np.int8)
    r_rating = np.clip(rng.normal(4.0, 0.5, n_restaurants), 1.0, 5.0).astype(np.float32)

    per_restaurant = rng.integers(10, 31, n_restaurants)
    item_restaurant = np.repeat(np.arange(n_restaurants), per_restaurant).astype(np.int32)
    n_items = int(item_restaurant.shape[0])
    item_category = rng.choice(len(CATEGORIES), n_items, p=[0.5, 0.15, 0.15, 0.1, 0.1]).astype(
        np.int8
    )
    item_price = (4.0 * r_price_level[item_restaurant] * rng.lognormal(0.0, 0.3, n_items)).astype(
        np.float32
    )
    catalogue = Catalogue(
        restaurant_lat=r_lat,
        restaurant_lon=r_lon,
        restaurant_cuisine=r_cuisine,
        restaurant_price_level=r_price_level,
        restaurant_rating=r_rating,
        restaurant_is_open=rng.random(n_restaurants) < 0.92,
        restaurant_district=r_district,
        item_restaurant=item_restaurant,
        item_category=item_category,
        item_price=item_price,
        item_available=rng.random(n_items) < 0.97,
    )

    cuisine_latent = rng.normal(0, 1, (len(CUISINES), dim))
    item_latent = (
        cuisine_latent[r_cuisine[item_restaurant]] + 0.5 * rng.normal(0, 1, (n_items, dim))
    ) / np.sqrt(dim)
    favourite = rng.integers(0, len(CUISINES), (n_users, 2))
    taste = (
        (cuisine_latent[favourite].mean(axis=1) + 0.4 * rng.normal(0, 1, (n_users, dim)))
        / np.sqrt(dim)
        * 3.0
    )
    home_district = rng.integers(0, n_districts, n_users)
    home_lat = district_lat[home_district] + rng.normal(0, 0.01, n_users)
    home_lon = district_lon[home_district] + rng.normal(0, 0.015, n_users)
    price_sensitivity = rng.uniform(0.2, 1.2, n_users)

    n_sessions = n_users * sessions_per_user
    s_user = np.repeat(np.arange(n_users), sessions_per_user)
    s_day = rng.integers(0, n_days, n_sessions)
    order = np.lexsort((s_user, s_day))
    s_user, s_day = s_user[order], s_day[order]
    s_hour = np.where(rng.random(n_sessions) < 0.5, 12, 19) + rng.integers(-2, 3, n_sessions)
    s_lat = home_lat[s_user] + rng.normal(0, 0.003, n_sessions)
    s_lon = home_lon[s_user] + rng.normal(0, 0.004, n_sessions)

    # The old feed: 70% of impressions from restaurants in the user's district, 30% anywhere.
    m = n_sessions * impressions
    row_session = np.repeat(np.arange(n_sessions), impressions)
    row_user = s_user[row_session]
    items = rng.integers(0, n_items, m)
    local = rng.random(m) < 0.7
    item_district = r_district[item_restaurant]
    for d in range(n_districts):  # a loop over districts, not rows
        pool = np.flatnonzero(item_district == d)
        rows = np.flatnonzero(local & (home_district[row_user] == d))
        items[rows] = pool[rng.integers(0, pool.size, rows.size)]
    rest = item_restaurant[items]
    distance = np.hypot(
        (s_lat[row_session] - r_lat[rest]) * KM_PER_DEGREE_LAT,
        (s_lon[row_session] - r_lon[rest]) * KM_PER_DEGREE_LAT * np.cos(np.radians(CENTER[0])),
    )
    position = np.tile(np.arange(impressions), n_sessions).astype(np.int16)
    logit = (
        np.einsum("ij,ij->i", taste[row_user], item_latent[items])
        - 0.45 * distance
        + 0.9 * (r_rating[rest] - 4.0)
        - price_sensitivity[row_user] * np.log(item_price[items] / 10.0)
        - 0.04 * position
        - 1.6
    )
    clicked = rng.random(m) < 1.0 / (1.0 + np.exp(-logit))
    ordered = clicked & (rng.random(m) < 0.3)

    log = InteractionLog(
        session=row_session.astype(np.int32),
        user=row_user.astype(np.int32),
        item=items.astype(np.int32),
        day=s_day[row_session].astype(np.int16),
        hour=s_hour[row_session].astype(np.int8),
        lat=s_lat[row_session].astype(np.float32),
        lon=s_lon[row_session].astype(np.float32),
        position=position,
        clicked=clicked,
        ordered=ordered,
    )
    users = Users(
        user_ids=np.array([f"user-{u:07d}" for u in range(n_users)]),
        home_lat=home_lat,
        home_lon=home_lon,
    )
    meta = WorldMeta(
        seed=seed,
        n_skus=n_items,
        n_users=n_users,
        n_days=n_days,
        center_lat=CENTER[0],
        center_lon=CENTER[1],
        n_districts=n_districts,
    )
    noise = np.random.default_rng(seed + 1)
    return PlantedWorld(
        world=World(catalogue=catalogue, users=users, log=log, meta=meta),
        user_vectors=(taste + 0.3 * noise.normal(0, 1, taste.shape)).astype(np.float32),
        item_vectors=(item_latent + 0.1 * noise.normal(0, 1, item_latent.shape)).astype(np.float32),
    )


@pytest.fixture(scope="session")
def planted() -> PlantedWorld:
    return make_world()


@pytest.fixture(scope="session")
def world(planted: PlantedWorld) -> World:
    return planted.world


@pytest.fixture(scope="session")
def tables(planted: PlantedWorld) -> FeatureTables:
    return build_feature_tables(planted.world, planted.user_vectors, planted.item_vectors)


@pytest.fixture(scope="session")
def trained(world: World, tables: FeatureTables) -> TrainedRanker:
    return train_ranker(world, tables, SMALL_PARAMS)
