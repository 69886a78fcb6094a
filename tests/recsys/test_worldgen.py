"""The demo world: schema, determinism, and whether its logs carry the signal they should."""

from __future__ import annotations

import typing
from dataclasses import fields
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.geo import haversine_km
from recsys.world import (
    CATEGORIES,
    CUISINES,
    Catalogue,
    InteractionLog,
    Users,
    World,
    load_world,
    save_world,
)
from recsys.worldgen import (
    Shown,
    calibrated_bias,
    generate_world,
    respond,
    response_logits,
    world_truth,
)

N_SKUS, N_USERS, SEED = 4_000, 1_500, 11


@pytest.fixture(scope="module")
def world() -> World:
    return generate_world(N_SKUS, N_USERS, SEED)


def _columns(world: World) -> dict[str, npt.NDArray[typing.Any]]:
    return {
        f"{part}.{f.name}": getattr(getattr(world, part), f.name)
        for part in ("catalogue", "users", "log")
        for f in fields(getattr(world, part))
    }


def _schema_dtype(cls: type, name: str) -> type[np.generic]:
    """The scalar type in a schema annotation such as ``npt.NDArray[np.float32]``."""
    hint = typing.get_type_hints(cls)[name]  # ndarray[Any, dtype[np.float32]]
    scalar: type[np.generic] = typing.get_args(typing.get_args(hint)[1])[0]
    return scalar


def _check_invariants(world: World) -> None:
    """Rules every generated world obeys, whatever its size and seed."""
    cat, log = world.catalogue, world.log
    for cls, part in ((Catalogue, cat), (Users, world.users), (InteractionLog, log)):
        for f in fields(part):
            column = getattr(part, f.name)
            expected = _schema_dtype(cls, f.name)
            assert np.issubdtype(column.dtype, expected), (f.name, column.dtype, expected)
            assert column.ndim == 1, f.name
    assert cat.n_items == world.meta.n_skus
    assert cat.n_restaurants == max(1, world.meta.n_skus // 20)
    assert set(np.unique(cat.item_restaurant)) == set(range(cat.n_restaurants))
    assert np.all(np.diff(log.session) >= 0)
    assert np.all(np.diff(log.day) >= 0), "sessions come in day order"
    assert np.all((log.user >= 0) & (log.user < world.users.n_users))
    assert np.all((log.item >= 0) & (log.item < cat.n_items))
    assert np.all((log.day >= 0) & (log.day < world.meta.n_days))
    assert not np.any(log.ordered & ~log.clicked), "an order implies a click"
    if log.n_rows == 0:  # a few users may all have drawn zero sessions
        return

    # A session's rows are contiguous, share one user, time and address, and number their slots.
    starts = np.flatnonzero(np.r_[True, log.session[1:] != log.session[:-1]])
    assert np.array_equal(log.session[starts], np.arange(starts.shape[0]))
    session_of_row = np.repeat(starts, np.diff(np.r_[starts, log.n_rows]))
    for column in (log.user, log.day, log.hour, log.lat, log.lon):
        assert np.array_equal(column, column[session_of_row])
    assert np.array_equal(log.position, np.arange(log.n_rows) - session_of_row)


def test_world_matches_the_schema(world: World) -> None:
    _check_invariants(world)
    cat, log = world.catalogue, world.log
    assert cat.n_restaurants == N_SKUS // 20
    assert world.users.user_ids[42] == "user-0000042"
    assert np.unique(world.users.user_ids).shape[0] == N_USERS
    assert cat.restaurant_cuisine.max() < len(CUISINES)
    assert cat.item_category.max() < len(CATEGORIES)
    assert set(np.unique(cat.restaurant_price_level)) <= {1, 2, 3, 4}
    assert np.all((cat.restaurant_rating >= 1.0) & (cat.restaurant_rating <= 5.0))
    assert np.all(cat.item_price > 0)
    assert 0.85 < cat.restaurant_is_open.mean() < 0.97
    assert 0.01 < 1.0 - cat.item_available.mean() < 0.06
    assert np.bincount(cat.item_category).argmax() == CATEGORIES.index("main")
    assert log.position.max() == 19
    assert np.all((log.hour >= 0) & (log.hour <= 23))
    distance = haversine_km(cat.restaurant_lat, cat.restaurant_lon, 52.52, 13.40)
    assert distance.max() < 20.0, "restaurants stay in the metro area"
    sessions_per_user = np.bincount(log.user[np.r_[True, np.diff(log.session) > 0]])
    assert 18 < sessions_per_user.mean() < 30


def test_same_seed_same_bytes_other_seed_other_world(world: World) -> None:
    again = _columns(generate_world(N_SKUS, N_USERS, SEED))
    for name, column in _columns(world).items():
        assert column.dtype == again[name].dtype, name
        assert column.tobytes() == again[name].tobytes(), name
    other = generate_world(N_SKUS, N_USERS, SEED + 1)
    assert not np.array_equal(other.catalogue.restaurant_lat, world.catalogue.restaurant_lat)
    assert not np.array_equal(other.log.clicked[:1000], world.log.clicked[:1000])


def test_save_and_load_round_trip(world: World, tmp_path: Path) -> None:
    save_world(world, tmp_path)
    loaded = load_world(tmp_path)
    assert loaded.meta == world.meta
    original = _columns(world)
    for name, column in _columns(loaded).items():
        assert column.dtype == original[name].dtype, name
        assert np.array_equal(column, original[name]), name


def test_loaded_columns_are_plain_read_only_views_of_the_mapped_files(
    world: World, tmp_path: Path
) -> None:
    """Mapped, not copied (the pages stay shared), but not the np.memmap subclass, whose
    Python-level indexing every gather on the request path would pay."""
    save_world(world, tmp_path)
    for name, column in _columns(load_world(tmp_path)).items():
        assert type(column) is np.ndarray, name
        assert isinstance(column.base, np.memmap), name
        assert not column.flags.writeable, name
    for name, column in _columns(load_world(tmp_path, mmap=False)).items():
        assert type(column) is np.ndarray, name
        assert not isinstance(column.base, np.memmap), name


def test_progress_reports_milestones() -> None:
    messages: list[str] = []
    generate_world(200, 20, 3, progress=messages.append)
    assert len(messages) >= 4
    assert any("clicks" in m for m in messages)


@pytest.mark.parametrize("bad", [{"n_skus": 0}, {"n_users": 0}, {"n_days": 0}])
def test_rejects_empty_worlds(bad: dict[str, int]) -> None:
    args = {"n_skus": 100, "n_users": 10, **bad}
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        generate_world(
            args["n_skus"], args["n_users"], n_days=args["n_days"] if "n_days" in bad else 28
        )


@settings(max_examples=20, deadline=None)
@given(
    n_skus=st.integers(1, 600),
    n_users=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
    n_days=st.integers(1, 10),
)
def test_any_world_obeys_the_schema(n_skus: int, n_users: int, seed: int, n_days: int) -> None:
    _check_invariants(generate_world(n_skus, n_users, seed, n_days=n_days))


# The signal: clicks follow distance, rating, taste and time of day, as the hidden truth says.


def _ctr(clicked: npt.NDArray[np.bool_], mask: npt.NDArray[np.bool_]) -> float:
    assert mask.sum() > 500, "too few impressions to compare"
    return float(clicked[mask].mean())


def test_click_and_order_rates_are_sane(world: World) -> None:
    log, cat = world.log, world.catalogue
    assert 0.05 <= log.clicked.mean() <= 0.10
    assert 0.25 <= log.ordered.sum() / log.clicked.sum() <= 0.35
    orderable = cat.restaurant_is_open[cat.item_restaurant[log.item]] & cat.item_available[log.item]
    assert (~orderable).sum() > 0, "old logs do show closed restaurants and sold-out items"
    assert log.ordered[~orderable].sum() / log.clicked[~orderable].sum() < 0.03


def test_nearby_restaurants_get_more_clicks(world: World) -> None:
    log, cat = world.log, world.catalogue
    rest = cat.item_restaurant[log.item]
    km = haversine_km(
        log.lat.astype(np.float64),
        log.lon.astype(np.float64),
        cat.restaurant_lat[rest],
        cat.restaurant_lon[rest],
    )
    assert _ctr(log.clicked, km < 2.0) > 3.0 * _ctr(log.clicked, km > 6.0)


def test_higher_rated_restaurants_get_more_clicks(world: World) -> None:
    log, cat = world.log, world.catalogue
    rating = cat.restaurant_rating[cat.item_restaurant[log.item]]
    low, high = np.quantile(rating, [0.25, 0.75])
    assert _ctr(log.clicked, rating >= high) > 1.3 * _ctr(log.clicked, rating <= low)


def test_top_slots_get_more_clicks(world: World) -> None:
    log = world.log
    assert _ctr(log.clicked, log.position <= 2) > 1.5 * _ctr(log.clicked, log.position >= 15)


def test_breakfast_sells_in_the_morning(world: World) -> None:
    log, cat = world.log, world.catalogue
    breakfast = cat.restaurant_cuisine[cat.item_restaurant[log.item]] == CUISINES.index("breakfast")
    morning = (log.hour >= 6) & (log.hour <= 10)
    evening = (log.hour >= 18) & (log.hour <= 22)
    assert _ctr(log.clicked, breakfast & morning) > 2.0 * _ctr(log.clicked, breakfast & evening)


def test_users_keep_their_favourite_cuisine(world: World) -> None:
    """A user's most-clicked cuisine in the history window beats their average later on.

    The favourite is picked on history and scored on the recent window, so picking the maximum
    cannot by itself make it look good.
    """
    log, cat = world.log, world.catalogue
    n_cuisines = len(CUISINES)
    key = (
        log.user.astype(np.int64) * n_cuisines
        + cat.restaurant_cuisine[cat.item_restaurant[log.item]]
    )
    history = world.history_mask()
    clicks = np.bincount(key[history], log.clicked[history], N_USERS * n_cuisines)
    favourite = clicks.reshape(N_USERS, n_cuisines).argmax(axis=1)
    active = clicks.reshape(N_USERS, n_cuisines).sum(axis=1) >= 5
    recent = ~history & active[log.user]
    on_favourite = recent & (key == log.user.astype(np.int64) * n_cuisines + favourite[log.user])
    assert _ctr(log.clicked, on_favourite) > 1.5 * _ctr(log.clicked, recent)


def test_the_truth_regenerates_from_the_seed_and_reproduces_the_builds_calibration(
    world: World,
) -> None:
    truth = world_truth(world.meta)
    for name, column in _columns(world).items():
        part, field = name.split(".")
        if part == "catalogue":
            assert np.array_equal(getattr(truth.catalogue, field), column), name
    assert np.array_equal(truth.users.user_ids, world.users.user_ids)
    # The build's own bias, from its draws, against the one recomputed from the saved log.
    rng = np.random.default_rng(0)
    log = world.log
    shown = Shown(log.user, log.item, log.position, log.hour, log.lat, log.lon)
    click, order = response_logits(truth, shown)
    _clicked, _ordered, fitted = respond(rng, click, order)
    recomputed = calibrated_bias(truth, log)
    assert recomputed.click == pytest.approx(fitted.click, abs=1e-3)
    assert recomputed.order == pytest.approx(fitted.order, abs=0.05)
    # Drawn again with the recomputed bias, the log's impressions give the log's click rate.
    clicked, _ordered, _ = respond(rng, click, order, recomputed)
    assert clicked.mean() == pytest.approx(log.clicked.mean(), abs=0.005)


def test_a_fixed_bias_lets_better_feeds_get_more_clicks(world: World) -> None:
    truth = world_truth(world.meta)
    log = world.log
    bias = calibrated_bias(truth, log)
    top = Shown(log.user, log.item, np.zeros_like(log.position), log.hour, log.lat, log.lon)
    click, order = response_logits(truth, top)  # every item in the first slot
    clicked, _ordered, same = respond(np.random.default_rng(1), click, order, bias)
    assert same == bias
    assert clicked.mean() > log.clicked.mean() + 0.01
