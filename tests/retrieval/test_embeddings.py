"""Learned vectors: shapes, determinism, history-only learning, backoff, and ranking quality."""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt
import pytest

from recsys.retrieval.embeddings import Embeddings, learn_embeddings
from recsys.world import World
from recsys.worldgen import generate_world

DIM = 16


@pytest.fixture(scope="module")
def world() -> World:
    return generate_world(4_000, 1_500, 11)


@pytest.fixture(scope="module")
def embeddings(world: World) -> Embeddings:
    return learn_embeddings(world, DIM, seed=7)


def _with_clicks(world: World, clicked: npt.NDArray[np.bool_]) -> World:
    log = dataclasses.replace(world.log, clicked=clicked, ordered=world.log.ordered & clicked)
    return dataclasses.replace(world, log=log)


def session_auc(world: World, score: npt.NDArray[np.float64], rows: npt.NDArray[np.bool_]) -> float:
    """Mean over sessions (with a click and a non-click) of the clicked-vs-not AUC of ``score``.

    Tied scores share their mean rank, so a constant score (an unknown user) counts as chance
    rather than inheriting the log's row order.
    """
    session, clicked = world.log.session[rows], world.log.clicked[rows]
    order = np.lexsort((score, session))
    session, clicked, score = session[order], clicked[order], score[order]
    n = session.shape[0]
    starts = np.flatnonzero(np.r_[True, session[1:] != session[:-1]])
    group = np.repeat(np.arange(starts.shape[0]), np.diff(np.r_[starts, n]))
    rank = (np.arange(n) - starts[group] + 1).astype(np.float64)
    tie_starts = np.flatnonzero(
        np.r_[True, (session[1:] != session[:-1]) | (score[1:] != score[:-1])]
    )
    tie = np.repeat(np.arange(tie_starts.shape[0]), np.diff(np.r_[tie_starts, n]))
    rank = (np.bincount(tie, rank) / np.bincount(tie))[tie]
    positives = np.bincount(group, clicked)
    negatives = np.bincount(group) - positives
    rank_sum = np.bincount(group, rank * clicked)
    ok = (positives > 0) & (negatives > 0)
    auc = (rank_sum[ok] - positives[ok] * (positives[ok] + 1) / 2) / (positives[ok] * negatives[ok])
    assert ok.sum() > 1000, "too few sessions to measure"
    return float(auc.mean())


def test_session_auc_counts_ties_as_chance(world: World) -> None:
    rows = ~world.history_mask()
    clicked = world.log.clicked[rows].astype(np.float64)
    assert session_auc(world, clicked, rows) == 1.0
    assert session_auc(world, -clicked, rows) == 0.0
    assert session_auc(world, np.zeros(int(rows.sum())), rows) == 0.5


def _scores(world: World, emb: Embeddings, rows: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
    users = emb.user_vectors[world.log.user[rows]]
    items = emb.item_vectors[world.log.item[rows]]
    return np.asarray(np.einsum("ij,ij->i", users, items), dtype=np.float64)


def test_shapes_dtypes_and_values(world: World, embeddings: Embeddings) -> None:
    assert embeddings.user_vectors.shape == (world.users.n_users, DIM)
    assert embeddings.item_vectors.shape == (world.catalogue.n_items, DIM)
    assert embeddings.user_vectors.dtype == np.float32
    assert embeddings.item_vectors.dtype == np.float32
    assert np.isfinite(embeddings.user_vectors).all()
    assert np.isfinite(embeddings.item_vectors).all()
    assert np.all(np.linalg.norm(embeddings.item_vectors, axis=1) > 0), "every item has a vector"


def test_only_users_with_history_clicks_have_vectors(world: World, embeddings: Embeddings) -> None:
    history = world.history_mask() & world.log.clicked
    has_history = np.bincount(world.log.user[history], minlength=world.users.n_users) > 0
    assert (~has_history).any() or has_history.all()
    norms = np.linalg.norm(embeddings.user_vectors, axis=1)
    assert np.all(norms[~has_history] == 0.0)
    assert np.all(norms[has_history] > 0.0)


def test_same_seed_same_bytes(world: World, embeddings: Embeddings) -> None:
    again = learn_embeddings(world, DIM, seed=7)
    assert again.user_vectors.tobytes() == embeddings.user_vectors.tobytes()
    assert again.item_vectors.tobytes() == embeddings.item_vectors.tobytes()


def test_learns_from_the_history_window_only(world: World, embeddings: Embeddings) -> None:
    recent = ~world.history_mask()
    rewritten = world.log.clicked.copy()
    rewritten[recent] = np.random.default_rng(0).random(int(recent.sum())) < 0.5
    other = learn_embeddings(_with_clicks(world, rewritten), DIM, seed=7)
    assert np.array_equal(other.user_vectors, embeddings.user_vectors)
    assert np.array_equal(other.item_vectors, embeddings.item_vectors)


def test_unclicked_items_back_off_to_their_restaurant(world: World, embeddings: Embeddings) -> None:
    """Items without history clicks take their restaurant's (category-specific) prior."""
    cat = world.catalogue
    history = world.history_mask() & world.log.clicked
    clicked = np.zeros(cat.n_items, np.bool_)
    clicked[world.log.item[history]] = True
    key = cat.item_restaurant.astype(np.int64) * 8 + cat.item_category
    cold = np.flatnonzero(~clicked)
    order = cold[np.argsort(key[cold], kind="stable")]
    same = key[order[1:]] == key[order[:-1]]
    assert same.sum() > 50, "the small world has cold siblings to compare"
    vectors = embeddings.item_vectors
    assert np.array_equal(vectors[order[1:][same]], vectors[order[:-1][same]])
    # Cold items of different restaurants differ: the prior carries the restaurant.
    first_of_restaurant = cold[np.r_[True, np.diff(cat.item_restaurant[cold]) != 0]]
    unique_rows = np.unique(vectors[first_of_restaurant], axis=0).shape[0]
    assert unique_rows > 0.9 * first_of_restaurant.shape[0]


def test_ranks_recent_clicks_above_chance_and_a_shuffled_control(
    world: World, embeddings: Embeddings
) -> None:
    recent = ~world.history_mask()
    learned = session_auc(world, _scores(world, embeddings, recent), recent)
    rng = np.random.default_rng(1)
    shuffled = Embeddings(
        user_vectors=embeddings.user_vectors,
        item_vectors=embeddings.item_vectors[rng.permutation(world.catalogue.n_items)],
    )
    control = session_auc(world, _scores(world, shuffled, recent), recent)
    chance = session_auc(world, rng.random(int(recent.sum())), recent)
    assert abs(chance - 0.5) < 0.03
    assert abs(control - 0.5) < 0.03
    assert learned > 0.62
    assert learned > control + 0.08


def test_tiny_world_pads_to_the_requested_dimension() -> None:
    emb = learn_embeddings(generate_world(25, 3, 1), dim=32, seed=7)
    assert emb.user_vectors.shape == (3, 32)
    assert emb.item_vectors.shape == (25, 32)
    assert np.isfinite(emb.item_vectors).all()
    assert np.all(np.linalg.norm(emb.item_vectors, axis=1) > 0)


def test_a_world_without_clicks_is_rejected(world: World) -> None:
    with pytest.raises(ValueError, match="no clicks in its history window"):
        learn_embeddings(_with_clicks(world, np.zeros_like(world.log.clicked)), DIM)
