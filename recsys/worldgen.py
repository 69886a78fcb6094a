"""The demo world generator: a synthetic metro area whose logs carry real, learnable signal.

A hidden truth drives the log and is never saved: latent vectors per cuisine, category and
restaurant (plus a per-item offset), item and restaurant quality, and per user a taste vector
built from 1-3 favourite cuisines, a price sensitivity, a sweet tooth and an hour-of-day profile.
It is drawn first, so :func:`world_truth` regenerates it from a world's metadata (seed and
sizes) without the log: the traffic simulator (recsys/simulation) reads it that way, and
serving never does.
Each session is an old production feed (mostly items near the delivery address, some globally
popular ones, a few random), and a click follows a logistic model of taste, quality, distance,
price, time of day and position, calibrated to a target click-through rate; an order follows a
click with its own calibrated probability.

:func:`response_logits` and :func:`respond` are the one response model: the build draws the
log's clicks and orders with them, the simulator draws live users' clicks and orders on served
feeds with them (with the build's calibration, :func:`calibrated_bias`).

Everything is vectorised over restaurants, items, sessions and impressions; the only loops run
over a fixed handful of stages or chunks. One ``np.random.Generator`` drives every draw, in a
fixed order, so a seed gives byte-identical arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.special import expit

from recsys.geo import haversine_km
from recsys.world import (
    CATEGORIES,
    CUISINES,
    Catalogue,
    InteractionLog,
    Users,
    World,
    WorldMeta,
)

CENTER_LAT = 52.52
CENTER_LON = 13.40
N_DISTRICTS = 24
NEIGHBOURS = 3
SKUS_PER_RESTAURANT = 20
LATENT_DIM = 16
ITEM_DIRECTIONS = 1024
IMPRESSIONS_PER_SESSION = 20
SESSIONS_PER_28_DAYS = 24.0
TARGET_CTR = 0.07
TARGET_ORDER_RATE = 0.30
KM_PER_DEGREE = 111.32
ROW_CHUNK = 1 << 20
CALIBRATION_SAMPLE = 200_000

# Where an old feed's impressions came from: near the address, globally popular, random.
SOURCE_SHARES = (0.72, 0.18, 0.10)
SAME_DISTRICT_SHARE = 0.6

_CUISINE = {name: i for i, name in enumerate(CUISINES)}
_CATEGORY = {name: i for i, name in enumerate(CATEGORIES)}
# Typical price of a main, starter, side, drink and dessert at price level 2.
CATEGORY_REFERENCE_PRICE = np.array([11.5, 6.0, 4.0, 3.0, 5.5])
PRICE_LEVEL_FACTOR = np.array([0.75, 1.0, 1.35, 1.85])  # price levels 1..4

# Hour-of-day modes of a user's sessions: breakfast, lunch, dinner, late night (centre, sd).
HOUR_MODES = np.array([[8.0, 1.0], [12.5, 1.0], [19.0, 1.3], [22.5, 1.0]])
HOUR_MODE_ALPHA = np.array([0.4, 2.0, 2.5, 0.5])

Progress = Callable[[str], None]
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Districts:
    lat: FloatArray  # [D]
    lon: FloatArray  # [D]
    weight: FloatArray  # [D] share of restaurants and homes, sums to 1
    neighbours: IntArray  # [D, NEIGHBOURS] nearest other districts
    cuisine_p: FloatArray  # [D, C] cuisine mix (district flavour over global popularity)


@dataclass(frozen=True)
class Latents:
    """The hidden taste space: users' tastes and items' latents live in it."""

    cuisine: FloatArray  # [C, L]
    category: FloatArray  # [K, L]
    directions: FloatArray  # [ITEM_DIRECTIONS, L] a bank of per-item offsets


@dataclass(frozen=True)
class ItemTruth:
    restaurant_latent: npt.NDArray[np.float32]  # [R, L] cuisine vector + restaurant offset
    restaurant_quality: npt.NDArray[np.float32]  # [R]
    direction: npt.NDArray[np.int16]  # [N] the item's own offset: a row of the direction bank
    quality: npt.NDArray[np.float32]  # [N]
    feed_weight: FloatArray  # [N] how often the old feed showed the item


@dataclass(frozen=True)
class UserTruth:
    taste: npt.NDArray[np.float32]  # [U, L]
    price_sensitivity: FloatArray  # [U]
    sweet_tooth: FloatArray  # [U]
    hour_profile: FloatArray  # [U, len(HOUR_MODES)]
    activity: FloatArray  # [U] expected sessions per 28 days


@dataclass(frozen=True)
class _Sessions:
    user: npt.NDArray[np.int32]  # [S] sorted by (day, hour, user)
    day: npt.NDArray[np.int16]
    hour: npt.NDArray[np.int8]
    lat: FloatArray
    lon: FloatArray
    district: IntArray


@dataclass(frozen=True)
class WorldTruth:
    """Everything hidden behind a world's catalogue, users and log (never saved)."""

    districts: Districts
    latents: Latents
    catalogue: Catalogue
    items: ItemTruth
    users: Users
    tastes: UserTruth


@dataclass(frozen=True)
class Shown:
    """Impressions to respond to, one entry each: who saw which item, where and when."""

    user: npt.NDArray[np.integer[Any]]  # user rows
    item: npt.NDArray[np.integer[Any]]  # item rows (sku ids)
    position: npt.NDArray[np.integer[Any]]  # 0-based slot in the feed
    hour: npt.NDArray[np.integer[Any]]  # local hour 0-23
    lat: npt.NDArray[np.floating[Any]]  # delivery address
    lon: npt.NDArray[np.floating[Any]]


@dataclass(frozen=True)
class ResponseBias:
    """The logit offsets that calibrate the response model to the target rates on the build's
    own log (``TARGET_CTR`` per impression, ``TARGET_ORDER_RATE`` per click)."""

    click: float
    order: float


def generate_world(
    n_skus: int,
    n_users: int = 10_000,
    seed: int = 7,
    *,
    n_days: int = 28,
    progress: Progress | None = None,
) -> World:
    """A deterministic demo world: ``n_skus`` items, ``n_users`` users, ``n_days`` of logs."""
    for name, value in (("n_skus", n_skus), ("n_users", n_users), ("n_days", n_days)):
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    report = progress or (lambda _msg: None)
    rng = np.random.default_rng(seed)

    truth = _draw_truth(rng, n_skus, n_users, report)
    catalogue, users = truth.catalogue, truth.users
    sessions = _make_sessions(rng, truth.tastes, truth.districts, users, n_days)
    report(f"sessions: {sessions.user.shape[0]:,} over {n_days} days")
    row_session, item, position = _show_feeds(
        rng, sessions, catalogue, truth.items, truth.districts
    )
    report(f"impressions: {item.shape[0]:,}")
    shown = Shown(
        user=sessions.user[row_session],
        item=item,
        position=position,
        hour=sessions.hour[row_session],
        lat=sessions.lat[row_session],
        lon=sessions.lon[row_session],
    )
    click_logit, order_logit = response_logits(truth, shown)
    clicked, ordered, _bias = respond(rng, click_logit, order_logit)
    ctr = clicked.sum() / max(1, clicked.shape[0])
    report(f"clicks: {int(clicked.sum()):,} (CTR {ctr:.3f}), orders: {int(ordered.sum()):,}")

    log = InteractionLog(
        session=row_session,
        user=sessions.user[row_session],
        item=item,
        day=sessions.day[row_session],
        hour=sessions.hour[row_session],
        lat=sessions.lat[row_session].astype(np.float32),
        lon=sessions.lon[row_session].astype(np.float32),
        position=position,
        clicked=clicked,
        ordered=ordered,
    )
    meta = WorldMeta(
        seed=seed,
        n_skus=n_skus,
        n_users=n_users,
        n_days=n_days,
        center_lat=CENTER_LAT,
        center_lon=CENTER_LON,
        n_districts=N_DISTRICTS,
    )
    return World(catalogue=catalogue, users=users, log=log, meta=meta)


def world_truth(meta: WorldMeta) -> WorldTruth:
    """The hidden truth of the world ``meta`` describes, regenerated from its seed: the same
    draws, in the same order, as :func:`generate_world` makes before the log (0.5 s for the
    default 100k-SKU world; no log is generated)."""
    return _draw_truth(np.random.default_rng(meta.seed), meta.n_skus, meta.n_users, None)


def _draw_truth(
    rng: np.random.Generator, n_skus: int, n_users: int, progress: Progress | None
) -> WorldTruth:
    report = progress or (lambda _msg: None)
    districts = _make_districts(rng)
    latents = _make_latents(rng)
    catalogue, items = _make_catalogue(rng, n_skus, districts, latents)
    report(f"catalogue: {catalogue.n_restaurants:,} restaurants, {catalogue.n_items:,} items")
    users, tastes = _make_users(rng, n_users, districts, latents)
    report(f"users: {users.n_users:,}")
    return WorldTruth(districts, latents, catalogue, items, users, tastes)


def _offset(
    lat: FloatArray, lon: FloatArray, north_km: FloatArray, east_km: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Move points by kilometres north and east (flat-earth, fine within a metro area)."""
    new_lat = lat + north_km / KM_PER_DEGREE
    new_lon = lon + east_km / (KM_PER_DEGREE * np.cos(np.radians(lat)))
    return new_lat, new_lon


def _categorical(rng: np.random.Generator, table: FloatArray, group: IntArray) -> IntArray:
    """One draw per entry of ``group`` from its row of ``table`` ([G, K], rows sum to 1).

    Counts the cumulative thresholds below a uniform draw, one column at a time, so no
    [rows, K] temporary is built (rows run to millions of items).
    """
    cum = np.cumsum(table, axis=1)
    u = rng.random(group.shape[0])
    drawn = np.zeros(group.shape[0], np.int64)
    for k in range(table.shape[1] - 1):
        drawn += u >= cum[group, k]
    return drawn


def _categorical_n(rng: np.random.Generator, probs: FloatArray, n: int) -> IntArray:
    """``n`` draws from one distribution ``probs`` [K]."""
    cum = np.cumsum(probs)
    drawn = np.searchsorted(cum, rng.random(n) * cum[-1], side="right")
    return np.asarray(np.minimum(drawn, len(probs) - 1), dtype=np.int64)


def _make_districts(rng: np.random.Generator) -> Districts:
    # District 0 is the centre; the rest spread from 2 to 12 km, denser towards the middle.
    radius = np.concatenate([[0.5], 2.0 + 10.0 * np.sqrt(rng.random(N_DISTRICTS - 1))])
    angle = rng.random(N_DISTRICTS) * 2 * np.pi
    lat, lon = _offset(
        np.full(N_DISTRICTS, CENTER_LAT),
        np.full(N_DISTRICTS, CENTER_LON),
        radius * np.sin(angle),
        radius * np.cos(angle),
    )
    weight = rng.lognormal(0.0, 0.5, N_DISTRICTS) * np.exp(-radius / 15.0)
    distance = haversine_km(lat[:, None], lon[:, None], lat[None, :], lon[None, :])
    neighbours = np.argsort(distance, axis=1, kind="stable")[:, 1 : NEIGHBOURS + 1]
    popularity = 1.0 / (np.arange(len(CUISINES)) + 2.0) ** 0.8  # pizza, burgers, ... most popular
    flavour = rng.gamma(2.0, 0.5, (N_DISTRICTS, len(CUISINES)))
    cuisine_p = popularity * flavour
    return Districts(
        lat=lat,
        lon=lon,
        weight=weight / weight.sum(),
        neighbours=neighbours.astype(np.int64),
        cuisine_p=cuisine_p / cuisine_p.sum(axis=1, keepdims=True),
    )


def _category_probs() -> FloatArray:
    """[C, K] menu category mix per cuisine: mains dominate, dessert shops sell desserts."""
    probs = np.tile([0.50, 0.15, 0.13, 0.12, 0.10], (len(CUISINES), 1))
    probs[_CUISINE["desserts"]] = [0.12, 0.0, 0.05, 0.18, 0.65]
    probs[_CUISINE["breakfast"]] = [0.55, 0.05, 0.15, 0.20, 0.05]
    probs[_CUISINE["salads"]] = [0.60, 0.10, 0.10, 0.15, 0.05]
    return probs


def _make_latents(rng: np.random.Generator) -> Latents:
    scale = 1.0 / np.sqrt(LATENT_DIM)
    return Latents(
        cuisine=rng.normal(0.0, scale, (len(CUISINES), LATENT_DIM)),
        category=rng.normal(0.0, scale, (len(CATEGORIES), LATENT_DIM)),
        directions=rng.normal(0.0, scale, (ITEM_DIRECTIONS, LATENT_DIM)),
    )


def _make_catalogue(
    rng: np.random.Generator, n_skus: int, districts: Districts, latents: Latents
) -> tuple[Catalogue, ItemTruth]:
    n_rest = max(1, n_skus // SKUS_PER_RESTAURANT)
    district = _categorical_n(rng, districts.weight, n_rest)
    lat, lon = _offset(
        districts.lat[district],
        districts.lon[district],
        rng.normal(0.0, 1.0, n_rest),
        rng.normal(0.0, 1.0, n_rest),
    )
    cuisine = _categorical(rng, districts.cuisine_p, district)
    price_level = _categorical_n(rng, np.array([0.30, 0.42, 0.20, 0.08]), n_rest) + 1
    quality = rng.normal(0.0, 0.5, n_rest)
    noise = rng.normal(0.0, 0.3, n_rest) - rng.exponential(0.25, n_rest)
    rating = np.round(np.clip(4.15 + 0.6 * quality + noise, 1.0, 5.0), 1)
    is_open = rng.random(n_rest) < 0.92

    # Exactly n_skus items, at least one per restaurant, ~20 each on average.
    spare = rng.multinomial(n_skus - n_rest, _normalised(rng.gamma(3.0, 1.0, n_rest)))
    item_restaurant = np.repeat(np.arange(n_rest, dtype=np.int32), 1 + spare)
    category = _categorical(rng, _category_probs(), cuisine[item_restaurant])
    price = (
        CATEGORY_REFERENCE_PRICE[category]
        * PRICE_LEVEL_FACTOR[price_level[item_restaurant] - 1]
        * rng.lognormal(0.0, 0.22, n_skus)
    )
    price = np.maximum(np.round(price, 1), 0.5)
    available = rng.random(n_skus) >= 0.03

    offset = rng.normal(0.0, 1.0 / np.sqrt(LATENT_DIM), (n_rest, LATENT_DIM))
    restaurant_latent = latents.cuisine[cuisine] + 0.6 * offset
    direction = rng.integers(0, ITEM_DIRECTIONS, n_skus, dtype=np.int16)
    item_quality = rng.normal(0.0, 0.4, n_skus).astype(np.float32)

    # The old feed favoured good restaurants, good items, mains, and what was orderable.
    feed_log_weight = (
        0.8 * quality[item_restaurant]
        + 0.3 * (rating[item_restaurant] - 4.0)
        + 0.5 * item_quality
        + np.array([0.0, -0.7, -1.0, -1.2, -0.8])[category]
    )
    orderable = is_open[item_restaurant] & available
    feed_weight = np.exp(feed_log_weight) * np.where(orderable, 1.0, 0.3)

    catalogue = Catalogue(
        restaurant_lat=lat,
        restaurant_lon=lon,
        restaurant_cuisine=cuisine.astype(np.int16),
        restaurant_price_level=price_level.astype(np.int8),
        restaurant_rating=rating.astype(np.float32),
        restaurant_is_open=is_open,
        restaurant_district=district.astype(np.int16),
        item_restaurant=item_restaurant,
        item_category=category.astype(np.int8),
        item_price=price.astype(np.float32),
        item_available=available,
    )
    truth = ItemTruth(
        restaurant_latent=restaurant_latent.astype(np.float32),
        restaurant_quality=quality.astype(np.float32),
        direction=direction,
        quality=item_quality,
        feed_weight=feed_weight,
    )
    return catalogue, truth


def _normalised(weights: FloatArray) -> FloatArray:
    return np.asarray(weights / weights.sum(), dtype=np.float64)


def _make_users(
    rng: np.random.Generator, n_users: int, districts: Districts, latents: Latents
) -> tuple[Users, UserTruth]:
    district = _categorical_n(rng, districts.weight, n_users)
    home_lat, home_lon = _offset(
        districts.lat[district],
        districts.lon[district],
        rng.normal(0.0, 1.2, n_users),
        rng.normal(0.0, 1.2, n_users),
    )
    width = max(7, len(str(n_users - 1)))
    user_ids = np.strings.add("user-", np.strings.zfill(np.arange(n_users).astype(np.str_), width))

    # 1-3 distinct favourite cuisines (Gumbel top-k on the home district's mix), mixed by weight,
    # plus a personal component.
    keys = np.log(districts.cuisine_p[district]) + rng.gumbel(size=(n_users, len(CUISINES)))
    favourites = np.argsort(-keys, axis=1, kind="stable")[:, :3]
    n_favourites = _categorical_n(rng, np.array([0.30, 0.45, 0.25]), n_users) + 1
    mix = rng.gamma(2.0, 1.0, (n_users, 3)) * (np.arange(3) < n_favourites[:, None])
    mix /= mix.sum(axis=1, keepdims=True)
    taste = 1.8 * np.einsum("uf,ufl->ul", mix, latents.cuisine[favourites])
    taste += rng.normal(0.0, 0.6 / np.sqrt(LATENT_DIM), (n_users, LATENT_DIM))

    users = Users(user_ids=user_ids, home_lat=home_lat, home_lon=home_lon)
    truth = UserTruth(
        taste=taste.astype(np.float32),
        price_sensitivity=0.7 * rng.lognormal(0.0, 0.4, n_users),
        sweet_tooth=rng.lognormal(0.0, 0.5, n_users),
        hour_profile=rng.dirichlet(HOUR_MODE_ALPHA, n_users),
        activity=SESSIONS_PER_28_DAYS * rng.gamma(4.0, 0.25, n_users),
    )
    return users, truth


def _make_sessions(
    rng: np.random.Generator, users: UserTruth, districts: Districts, home: Users, n_days: int
) -> _Sessions:
    per_user = rng.poisson(users.activity * n_days / 28.0)
    user = np.repeat(np.arange(per_user.shape[0], dtype=np.int32), per_user)
    n = user.shape[0]
    weekday = np.where(np.arange(n_days) % 7 >= 5, 1.25, 1.0)  # weekends are busier
    day = _categorical_n(rng, weekday, n)
    mode = _categorical(rng, users.hour_profile, user.astype(np.int64))
    hour = np.round(rng.normal(HOUR_MODES[mode, 0], HOUR_MODES[mode, 1])).astype(np.int64) % 24

    # Mostly delivered home; sometimes to work or a friend's, anywhere in the city.
    away = rng.random(n) < 0.15
    elsewhere = _categorical_n(rng, districts.weight, n)
    base_lat = np.where(away, districts.lat[elsewhere], home.home_lat[user])
    base_lon = np.where(away, districts.lon[elsewhere], home.home_lon[user])
    spread = np.where(away, 1.0, 0.25)
    lat, lon = _offset(base_lat, base_lon, rng.normal(0.0, spread), rng.normal(0.0, spread))
    # Nearest district centre, on a local flat projection (exact enough across a city).
    north = lat[:, None] - districts.lat[None, :]
    east = (lon[:, None] - districts.lon[None, :]) * np.cos(np.radians(CENTER_LAT))
    district = np.argmin(north**2 + east**2, axis=1)

    order = np.lexsort((user, hour, day))
    return _Sessions(
        user=user[order],
        day=day[order].astype(np.int16),
        hour=hour[order].astype(np.int8),
        lat=lat[order],
        lon=lon[order],
        district=district[order],
    )


def _show_feeds(
    rng: np.random.Generator,
    sessions: _Sessions,
    catalogue: Catalogue,
    items: ItemTruth,
    districts: Districts,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.int16]]:
    """What an old production feed showed: (session row, item, position) per impression."""
    n_sessions = sessions.user.shape[0]
    n_items = catalogue.n_items
    short = rng.integers(8, IMPRESSIONS_PER_SESSION, n_sessions)
    length = np.where(rng.random(n_sessions) < 0.8, IMPRESSIONS_PER_SESSION, short)
    length = np.minimum(length, n_items)  # a tiny catalogue cannot fill a feed without repeats
    row_session = np.repeat(np.arange(n_sessions, dtype=np.int32), length)
    n_rows = row_session.shape[0]

    source = _categorical_n(rng, np.array(SOURCE_SHARES), n_rows)
    item = np.empty(n_rows, np.int64)
    local = source == 0
    home = sessions.district[row_session[local]]
    neighbour = districts.neighbours[home, rng.integers(0, NEIGHBOURS, home.shape[0])]
    target = np.where(rng.random(home.shape[0]) < SAME_DISTRICT_SHARE, home, neighbour)
    item_district = catalogue.restaurant_district[catalogue.item_restaurant]
    item[local] = _sample_in_districts(rng, target, item_district, items.feed_weight)
    popular = source == 1
    pool = np.argsort(-items.feed_weight, kind="stable")[: max(50, n_items // 200)]
    item[popular] = pool[rng.integers(0, pool.shape[0], int(popular.sum()))]
    anywhere = source == 2
    item[anywhere] = rng.integers(0, n_items, int(anywhere.sum()))

    # A feed shows an item once: redraw repeats at random (a tiny catalogue may keep a few).
    for _ in range(3):
        repeated = _repeated_in_session(row_session, item, n_items)
        if not repeated.any():
            break
        item[repeated] = rng.integers(0, n_items, int(repeated.sum()))

    # The old feed ordered its slots by its own popularity score, with noise.
    score = np.log(items.feed_weight[item]) + rng.gumbel(size=n_rows)
    item = item[_order_within_sessions(row_session, score)]
    start = np.cumsum(length) - length
    position = np.arange(n_rows) - start[row_session]
    return row_session, item.astype(np.int32), position.astype(np.int16)


def _sample_in_districts(
    rng: np.random.Generator,
    target: IntArray,
    item_district: npt.NDArray[np.int16],
    weight: FloatArray,
) -> IntArray:
    """One item per entry of ``target`` (a district), drawn in proportion to ``weight``.

    Items are laid out district by district with one cumulative weight array; a draw in
    district d is a uniform number in d's slice of the cumulative range, found by searchsorted.
    A district without items draws from the whole catalogue.
    """
    by_district = np.argsort(item_district, kind="stable")
    cum = np.cumsum(weight[by_district])
    sorted_district = item_district[by_district]
    start = np.searchsorted(sorted_district, np.arange(N_DISTRICTS), side="left")
    end = np.searchsorted(sorted_district, np.arange(N_DISTRICTS), side="right")
    empty = start == end
    start[empty], end[empty] = 0, cum.shape[0]
    low = np.where(start > 0, cum[start - 1], 0.0)
    high = cum[end - 1]
    u = low[target] + rng.random(target.shape[0]) * (high[target] - low[target])
    ascending = np.argsort(u)  # sorted needles make searchsorted cache-friendly on 4M items
    slot = np.empty(u.shape[0], np.int64)
    slot[ascending] = np.searchsorted(cum, u[ascending], side="right")
    return by_district[np.clip(slot, start[target], end[target] - 1)]


def _order_within_sessions(
    row_session: npt.NDArray[np.int32], score: FloatArray
) -> npt.NDArray[np.intp]:
    """Row order putting each session's rows by descending score, sessions kept in place.

    One stable sort of an int64 key (session in the high bits, the score quantised to 32 bits
    in the low ones) on rows already grouped by session: much cheaper than a lexsort.
    """
    if score.shape[0] == 0:
        return np.zeros(0, np.intp)
    low, high = score.min(), score.max()
    scaled = (high - score) / max(high - low, 1e-12) * (2**32 - 1)
    key = (row_session.astype(np.int64) << 32) | scaled.astype(np.int64)
    return np.argsort(key, kind="stable")


def _repeated_in_session(
    row_session: npt.NDArray[np.int32], item: IntArray, n_items: int
) -> npt.NDArray[np.bool_]:
    """True for the second and later showings of an item within one session."""
    key = row_session.astype(np.int64) * n_items + item
    order = np.argsort(key, kind="stable")
    ordered_key = key[order]
    repeated = np.zeros(key.shape[0], np.bool_)
    repeated[order[1:]] = ordered_key[1:] == ordered_key[:-1]
    return repeated


def _hour_effects() -> tuple[FloatArray, FloatArray]:
    """[24, C] and [24, K] click effects of the hour: breakfast mornings, dessert evenings."""
    hours = np.arange(24)
    morning = (hours >= 6) & (hours <= 10)
    lunch = (hours >= 11) & (hours <= 14)
    afternoon = (hours >= 14) & (hours <= 17)
    dinner = (hours >= 18) & (hours <= 21)
    evening = (hours >= 18) | (hours <= 1)
    night = (hours >= 21) | (hours <= 3)
    cuisine = np.zeros((24, len(CUISINES)))
    cuisine[:, _CUISINE["breakfast"]] = np.where(morning, 1.2, -0.8)
    cuisine[:, _CUISINE["desserts"]] = np.where(evening, 0.5, -0.2)
    cuisine[:, _CUISINE["pizza"]] = np.where(night, 0.3, 0.0)
    cuisine[:, _CUISINE["burgers"]] = np.where(night, 0.3, 0.0)
    cuisine[:, _CUISINE["salads"]] = np.where(lunch, 0.4, -0.1)
    category = np.zeros((24, len(CATEGORIES)))
    category[:, _CATEGORY["main"]] = np.where(morning, -0.3, 0.1)
    category[:, _CATEGORY["dessert"]] = np.where(evening, 0.5, -0.3)
    category[:, _CATEGORY["drink"]] = np.where(afternoon, 0.3, 0.0)
    category[:, _CATEGORY["starter"]] = np.where(dinner, 0.2, 0.0)
    return cuisine, category


def response_logits(truth: WorldTruth, shown: Shown) -> tuple[FloatArray, FloatArray]:
    """Click and order logits per impression (before calibration), from the hidden truth: taste,
    quality, rating, distance, price, time of day, position, and whether it can be ordered."""
    catalogue, items, users = truth.catalogue, truth.items, truth.tastes
    item = shown.item
    user = shown.user
    rest = catalogue.item_restaurant[item]
    category = catalogue.item_category[item]
    affinity = _affinity(user, item, rest, category, items, users, truth.latents)
    distance = haversine_km(
        shown.lat, shown.lon, catalogue.restaurant_lat[rest], catalogue.restaurant_lon[rest]
    )
    hour_cuisine, hour_category = _hour_effects()
    hour = shown.hour
    sweet = np.where(category == _CATEGORY["dessert"], users.sweet_tooth[user], 1.0)
    time_of_day = hour_cuisine[hour, catalogue.restaurant_cuisine[rest]]
    time_of_day += sweet * hour_category[hour, category]
    price = users.price_sensitivity[user] * np.log(
        catalogue.item_price[item] / CATEGORY_REFERENCE_PRICE[category]
    )
    quality = items.restaurant_quality[rest] + items.quality[item]
    is_open = catalogue.restaurant_is_open[rest]
    available = catalogue.item_available[item]

    click = affinity + 0.5 * items.restaurant_quality[rest] + items.quality[item]
    click += 0.3 * (catalogue.restaurant_rating[rest] - 4.0)
    click -= 0.35 * distance + 0.02 * distance**2  # people order nearby
    click += time_of_day - price - 0.45 * np.log1p(shown.position)
    click -= 1.0 * ~is_open + 0.6 * ~available

    order = 0.5 * affinity + 0.5 * quality - 0.1 * distance - 0.5 * price
    order -= 4.5 * ~(is_open & available)  # closed or sold out: rarely completes
    return np.asarray(click, np.float64), np.asarray(order, np.float64)


def respond(
    rng: np.random.Generator,
    click_logit: FloatArray,
    order_logit: FloatArray,
    bias: ResponseBias | None = None,
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_], ResponseBias]:
    """Clicks, and orders after clicks, drawn from the logits. Without ``bias`` the logits are
    calibrated to the target rates first (the build, on its whole log); with it (the simulator)
    they are not, so a better feed gets more clicks."""
    click_bias = _calibrate(click_logit, TARGET_CTR) if bias is None else bias.click
    clicked = rng.random(click_logit.shape[0]) < expit(click_logit + click_bias)
    if bias is None:
        bias = ResponseBias(click_bias, _calibrate(order_logit[clicked], TARGET_ORDER_RATE))
    ordered = clicked & (rng.random(order_logit.shape[0]) < expit(order_logit + bias.order))
    return clicked, ordered, bias


def calibrated_bias(truth: WorldTruth, log: InteractionLog) -> ResponseBias:
    """The bias the build calibrated, recomputed from its saved log: the same strided rows
    :func:`_calibrate` sampled (the log keeps the build's row order), so only the float32
    rounding of the saved addresses differs."""
    rows = np.arange(0, log.n_rows, _stride(log.n_rows))
    click, _ = response_logits(truth, _shown_rows(log, rows))
    clicked_rows = np.flatnonzero(np.asarray(log.clicked))
    clicked_rows = clicked_rows[:: _stride(clicked_rows.shape[0])]
    _, order = response_logits(truth, _shown_rows(log, clicked_rows))
    return ResponseBias(
        _calibrate(click, TARGET_CTR, stride=1), _calibrate(order, TARGET_ORDER_RATE, stride=1)
    )


def _shown_rows(log: InteractionLog, rows: IntArray) -> Shown:
    return Shown(
        user=np.asarray(log.user[rows]),
        item=np.asarray(log.item[rows]),
        position=np.asarray(log.position[rows]),
        hour=np.asarray(log.hour[rows]),
        lat=np.asarray(log.lat[rows], np.float64),
        lon=np.asarray(log.lon[rows], np.float64),
    )


def _affinity(
    user: npt.NDArray[np.integer[Any]],
    item: npt.NDArray[np.integer[Any]],
    rest: npt.NDArray[np.integer[Any]],
    category: npt.NDArray[np.integer[Any]],
    items: ItemTruth,
    users: UserTruth,
    latents: Latents,
) -> npt.NDArray[np.float32]:
    """taste . item latent per impression, in row chunks to bound the [rows, L] temporaries."""
    category_latent = (0.4 * latents.category).astype(np.float32)
    directions = (0.3 * latents.directions).astype(np.float32)
    out = np.empty(user.shape[0], np.float32)
    for lo in range(0, user.shape[0], ROW_CHUNK):
        rows = slice(lo, lo + ROW_CHUNK)
        latent = items.restaurant_latent[rest[rows]] + category_latent[category[rows]]
        latent += directions[items.direction[item[rows]]]
        out[rows] = np.einsum("ij,ij->i", users.taste[user[rows]], latent)
    return out


def _stride(n: int) -> int:
    return max(1, n // CALIBRATION_SAMPLE)


def _calibrate(
    logit: npt.NDArray[np.floating[Any]], target: float, *, stride: int | None = None
) -> float:
    """The bias b with mean(sigmoid(logit + b)) == target, by bisection on a strided sample."""
    if logit.shape[0] == 0:
        return 0.0
    step = _stride(logit.shape[0]) if stride is None else stride
    sample = logit[::step].astype(np.float64)
    low, high = -30.0, 30.0
    for _ in range(50):
        mid = 0.5 * (low + high)
        if expit(sample + mid).mean() < target:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)
