"""The result cache: what its key depends on, the snapshot rule, the bound."""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np
import pytest

from recsys.experiments.assignment import RequestAttributes
from recsys.serving.cache import ResultCache, cache_key
from recsys.types import Location, Recommendation, Request, ScoredItems

REQUEST = Request(request_id="r", user_id="u1", num_results=20, location=Location(52.5, 13.4))


def _rec(request_id: str = "r") -> Recommendation:
    items = ScoredItems(np.arange(3), np.arange(3), np.ones(3, dtype=np.float32))
    return Recommendation(request_id, items, "m1", "i1", "1")


def test_key_depends_on_everything_the_answer_depends_on_but_not_the_request_id() -> None:
    base = cache_key(REQUEST)
    assert cache_key(replace(REQUEST, request_id="other")) == base
    jitter = replace(REQUEST, location=Location(52.50001, 13.40001))
    assert cache_key(jitter) == base  # the same cell
    changed = [
        replace(REQUEST, user_id="u2"),
        replace(REQUEST, location=Location(52.6, 13.4)),
        replace(REQUEST, location=None),
        replace(REQUEST, surface="search"),
        replace(REQUEST, platform="ios"),
        replace(REQUEST, num_results=10),
        replace(REQUEST, exclude_sku_ids=(5,)),
        replace(REQUEST, hour=3),
    ]
    for request in changed:
        assert cache_key(request) != base, request


def test_the_key_holds_every_input_of_the_assignment() -> None:
    """A hit answers with the entry's assignment without assigning again: two requests that
    could be assigned differently under one snapshot must never share a key."""
    attributes = {f.name for f in fields(RequestAttributes)}
    assert attributes == {"surface", "platform", "has_location"}  # and the user id
    base = cache_key(REQUEST)
    for request in (
        replace(REQUEST, user_id="u2"),
        replace(REQUEST, surface="offers"),
        replace(REQUEST, platform="ios"),
        replace(REQUEST, location=None),  # has_location
    ):
        assert cache_key(request) != base


def test_a_new_snapshot_empties_the_cache_and_late_answers_of_the_old_one_are_dropped() -> None:
    cache = ResultCache(10)
    old, new = object(), object()
    key = cache_key(REQUEST)
    assert cache.get(old, key) is None
    cache.put(old, key, _rec())
    assert cache.get(old, key) is not None
    assert cache.get(new, key) is None  # any swap invalidates
    cache.put(old, key, _rec())  # computed on the old snapshot, finished after the swap
    assert cache.get(new, key) is None
    assert (cache.hits, cache.misses) == (1, 3)


def test_the_least_recently_used_entries_go_first() -> None:
    cache = ResultCache(2)
    snap = object()
    keys = [cache_key(replace(REQUEST, user_id=f"u{n}")) for n in range(3)]
    for key in keys[:2]:
        cache.get(snap, key)
        cache.put(snap, key, _rec())
    assert cache.get(snap, keys[0]) is not None  # now the most recent
    cache.put(snap, keys[2], _rec())
    assert len(cache) == 2
    assert cache.get(snap, keys[1]) is None
    assert cache.get(snap, keys[0]) is not None


def test_size_zero_is_off_and_negative_is_refused() -> None:
    cache = ResultCache(0)
    snap = object()
    key = cache_key(REQUEST)
    cache.get(snap, key)
    cache.put(snap, key, _rec())
    assert len(cache) == 0
    with pytest.raises(ValueError, match="max_entries is -1"):
        ResultCache(-1)
