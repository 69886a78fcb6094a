"""The result cache: what its key depends on, the snapshot rule, the bound."""

from __future__ import annotations

import gc
from dataclasses import fields, replace

import numpy as np
import pytest

from recsys.experiments.assignment import RequestAttributes
from recsys.serving.cache import HIT_STAGES, ResultCache, cache_key
from recsys.serving.metrics import ScoreHistograms
from recsys.serving.wire import encode_ahead, response_bytes, to_response
from recsys.types import Encodings, Exposure, Location, Recommendation, Request, ScoredItems

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
    assert cache.get(old, key, "r") is None
    cache.put(old, key, _rec())
    assert cache.get(old, key, "r") is not None
    assert cache.get(new, key, "r") is None  # any swap invalidates
    cache.put(old, key, _rec())  # computed on the old snapshot, finished after the swap
    assert cache.get(new, key, "r") is None
    assert (cache.hits, cache.misses) == (1, 3)


def test_the_least_recently_used_entries_go_first() -> None:
    cache = ResultCache(2)
    snap = object()
    keys = [cache_key(replace(REQUEST, user_id=f"u{n}")) for n in range(3)]
    for key in keys[:2]:
        cache.get(snap, key, "r")
        cache.put(snap, key, _rec())
    assert cache.get(snap, keys[0], "r") is not None  # now the most recent
    cache.put(snap, keys[2], _rec())
    assert len(cache) == 2
    assert cache.get(snap, keys[1], "r") is None
    assert cache.get(snap, keys[0], "r") is not None


def test_size_zero_is_off_and_negative_is_refused() -> None:
    cache = ResultCache(0)
    snap = object()
    key = cache_key(REQUEST)
    cache.get(snap, key, "r")
    cache.put(snap, key, _rec())
    assert len(cache) == 0
    with pytest.raises(ValueError, match="max_entries is -1"):
        ResultCache(-1)


def _computed(n: int) -> Recommendation:
    """An answer as the batched stages leave it: every field set, its wire forms made."""
    request = Request(
        request_id=f"first-{n}",
        user_id=f"u{n}",
        num_results=3,
        location=Location(52.5, 13.4 + n / 1000),
        surface="offers",
        platform="ios",
        exclude_sku_ids=(7, 9),
        hour=13,
    )
    items = ScoredItems(
        np.arange(3, dtype=np.int64) + n,
        np.arange(3, dtype=np.int64),
        np.array([0.9, 0.5, 0.1], dtype=np.float32),
    )
    answer = Recommendation(
        request_id=request.request_id,
        items=items,
        model_version="m1",
        index_version="i1",
        config_version="7",
        exposures=(Exposure("ranking", "exp-a", "treatment", n % 100), Exposure("ui", "e", "c", 3)),
        degraded_reasons=("availability: stale",),
        stage_seconds=(("retrieve", 0.001), ("rank", 0.002)),
        snapshot_id="snap-1",
        user_features=np.linspace(0.0, 1.0, 5),
        candidates=items if n % 2 else None,
        computed_for=request,
        encodings=Encodings(),
    )
    ScoreHistograms("s", "scores", [0.25, 0.75], 4).count_ahead([answer])
    encode_ahead([answer])
    return answer


def test_a_hit_is_the_stored_answer_with_its_own_request_id() -> None:
    cache = ResultCache(10)
    snap = object()
    for n in (1, 2):  # with and without the sampled candidates
        answer = _computed(n)
        key = cache_key(answer.computed_for or REQUEST)
        cache.get(snap, key, "first")
        cache.put(snap, key, answer)
        hit = cache.get(snap, key, f"again-{n}")
        assert hit is not None
        assert hit == replace(
            answer, request_id=f"again-{n}", stage_seconds=HIT_STAGES, cached=True
        )
        assert hit.computed_for == answer.computed_for
        assert hit.encodings is not None
        assert answer.encodings is not None
        assert hit.encodings is not answer.encodings  # its own, holding the same wire forms
        assert hit.encodings.response is answer.encodings.response
        assert hit.encodings.record is answer.encodings.record
        assert hit.encodings.score_counts is answer.encodings.score_counts
        assert response_bytes(hit) == to_response(hit).SerializeToString()


def test_cached_answers_are_objects_the_garbage_collector_does_not_track() -> None:
    """A full collection walks every tracked object: as built, a cached answer holds about
    eight (benchmarks/bench_gc_cache.py), so a full cache stalled the server."""
    snap = object()

    def filled() -> ResultCache:
        cache = ResultCache(1_000)
        cache.get(snap, cache_key(REQUEST), "r")
        for n in range(1_000):
            answer = _computed(n)
            cache.put(snap, cache_key(answer.computed_for or REQUEST), answer)
        return cache

    filled()  # once, so what the first fill imports or memoises is there
    gc.collect()
    before = len(gc.get_objects())
    cache = filled()
    for _ in range(3):  # a pass untracks a tuple once what it holds is untracked: nested, 3
        gc.collect()
    assert len(cache) == 1_000
    assert len(gc.get_objects()) - before < 20  # against ~8,000 as built


def test_an_entry_keeps_every_field_an_answer_has() -> None:
    """freeze and thaw name each field of an answer, its request and its exposures: a field
    added to one of them must be added there too, or hits would lose it."""
    assert [f.name for f in fields(Recommendation)] == [
        "request_id",
        "items",
        "model_version",
        "index_version",
        "config_version",
        "exposures",
        "degraded_reasons",
        "stage_seconds",
        "snapshot_id",
        "user_features",
        "candidates",
        "cached",
        "computed_for",
        "encodings",
    ]
    assert [f.name for f in fields(Request)] == [
        "request_id",
        "user_id",
        "num_results",
        "location",
        "surface",
        "platform",
        "exclude_sku_ids",
        "hour",
    ]
    assert [f.name for f in fields(Exposure)] == ["layer", "experiment", "arm", "bucket", "forced"]
    assert [f.name for f in fields(Location)] == ["lat", "lon"]
    assert [f.name for f in fields(ScoredItems)] == ["sku_ids", "restaurant_ids", "scores"]
    assert Encodings.__slots__ == ("record", "response", "score_counts")
