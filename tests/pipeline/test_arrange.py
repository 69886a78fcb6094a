from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.pipeline.arrange import (
    Arrange,
    arrange,
    arranged_positions,
    arranged_positions_batch,
    rank_within_group,
)
from recsys.pipeline.snapshot import ServingSnapshot
from recsys.pipeline.stages import build_stages
from recsys.stage import Batch, run_stages
from recsys.types import Location, Request


def test_rank_within_group_counts_in_display_order() -> None:
    groups = np.array([5, 3, 5, 5, 3, 9], dtype=np.int64)
    assert rank_within_group(groups).tolist() == [0, 0, 1, 2, 1, 0]


def test_arrange_applies_cap_exclusions_duplicates_and_order() -> None:
    sku = np.array([10, 11, 12, 13, 14, 11, 15], dtype=np.int64)
    rest = np.array([1, 1, 1, 2, 2, 1, 3], dtype=np.int64)
    score = np.array([0.9, 0.8, 0.7, 0.95, 0.1, 0.85, 0.5], dtype=np.float32)
    out = arrange(
        sku, rest, score, num_results=4, max_per_restaurant=2, exclude=np.array([13], np.int64)
    )
    # 13 excluded; 11 kept once with its best score; restaurant 1 capped at two (10, 11).
    assert out.sku_ids.tolist() == [10, 11, 15, 14]
    assert out.scores.tolist() == sorted(out.scores.tolist(), reverse=True)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 40), st.floats(-5, 5, width=32)), max_size=80),
    st.integers(1, 30),
    st.integers(1, 4),
    st.sets(st.integers(0, 40), max_size=5),
)
def test_arrange_rules_hold_for_any_input(
    rows: list[tuple[int, float]], n: int, cap: int, exclude: set[int]
) -> None:
    sku = np.array([r[0] for r in rows], dtype=np.int64)
    rest = sku % 7  # every SKU belongs to one restaurant, as in the catalogue
    score = np.array([r[1] for r in rows], dtype=np.float32)
    out = arrange(
        sku,
        rest,
        score,
        num_results=n,
        max_per_restaurant=cap,
        exclude=np.array(sorted(exclude), dtype=np.int64),
    )
    got = out.sku_ids.tolist()
    assert len(set(got)) == len(got)
    assert not set(got) & exclude
    assert np.all(np.diff(out.scores) <= 0)
    assert np.array_equal(out.restaurant_ids, out.sku_ids % 7)
    _, counts = np.unique(out.restaurant_ids, return_counts=True)
    assert np.all(counts <= cap)
    eligible = {s for s, _ in rows} - exclude
    best = {s: max(v for t, v in rows if t == s) for s in eligible}
    assert all(out.scores[i] == np.float32(best[s]) for i, s in enumerate(got))
    fill = sum(min(cap, len({s for s in eligible if s % 7 == r})) for r in range(7))
    assert len(got) == min(n, fill)


def reference_positions(
    sku: list[int], rest: list[int], score: list[float], n: int, cap: int, exclude: set[int]
) -> list[int]:
    """The rules one item at a time, best first (ties on the lower SKU id, then position)."""
    order = sorted(range(len(sku)), key=lambda i: (-float(np.float32(score[i])), sku[i], i))
    seen: set[int] = set()
    per_restaurant: dict[int, int] = {}
    out: list[int] = []
    for i in order:
        if sku[i] in exclude or sku[i] in seen:
            continue
        seen.add(sku[i])
        if per_restaurant.get(rest[i], 0) >= cap:
            continue
        per_restaurant[rest[i]] = per_restaurant.get(rest[i], 0) + 1
        out.append(i)
        if len(out) == n:
            break
    return out


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 300),
            st.one_of(st.sampled_from([0.0, -0.0, 0.5, 1.0]), st.floats(-5, 5, width=32)),
        ),
        max_size=300,
    ),
    st.integers(1, 12),
    st.integers(1, 3),
    st.sets(st.integers(0, 300), max_size=40),
    st.integers(2, 60),
)
def test_arranged_positions_match_the_rules_applied_one_by_one(
    rows: list[tuple[int, float]], n: int, cap: int, exclude: set[int], restaurants: int
) -> None:
    """Whether the best few candidates suffice (the usual case) or all are needed (ties at the
    prefix's bound, heavy exclusions, a restaurant cap that drops most), the positions are
    exactly those of the rules applied item by item over the whole best-first order."""
    sku = [r[0] for r in rows]
    rest = [s % restaurants for s in sku]
    score = [r[1] for r in rows]
    at = arranged_positions(
        np.array(sku, dtype=np.int64),
        np.array(rest, dtype=np.int64),
        np.array(score, dtype=np.float32),
        num_results=n,
        max_per_restaurant=cap,
        exclude=np.array(sorted(exclude), dtype=np.int64),
    )
    assert at.tolist() == reference_positions(sku, rest, score, n, cap, exclude)


def test_when_the_best_few_are_not_enough_all_candidates_are_arranged() -> None:
    """The best 4 x num_results all come from one restaurant (capped at one): the second
    result is found further down, as over the whole order."""
    sku = np.arange(30, dtype=np.int64)
    rest = np.where(sku < 12, 0, sku).astype(np.int64)
    score = (1.0 - sku / 100).astype(np.float32)
    at = arranged_positions(sku, rest, score, num_results=2, max_per_restaurant=1)
    assert at.tolist() == [0, 12]
    assert at.tolist() == reference_positions(
        sku.tolist(), rest.tolist(), score.tolist(), 2, 1, set()
    )


ONE_REQUEST = st.tuples(
    st.lists(
        st.tuples(
            st.integers(0, 60),
            st.one_of(
                st.sampled_from([0.0, -0.0, 0.5, 1.0, float("nan"), float("inf")]),
                st.floats(-5, 5, width=32),
            ),
        ),
        max_size=60,
    ),
    st.integers(1, 12),
    st.integers(1, 3),
    st.sets(st.integers(-2, 70), max_size=8),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ONE_REQUEST, min_size=1, max_size=8), st.sampled_from([0, 1 << 40]))
def test_a_batch_is_arranged_as_each_request_on_its_own(
    requests: list[tuple[list[tuple[int, float]], int, int, set[int]]], offset: int
) -> None:
    """One pass over the batch gives every request exactly its positions on its own: SKUs
    shared across requests, ties, -0.0, NaN and infinite scores, exclusions of SKUs no row holds,
    short prefixes. ``offset`` moves the SKU ids beyond what the packed sort key holds, so the
    three-key sort is checked too."""
    skus = [np.array([r[0] for r in rows], dtype=np.int64) + offset for rows, *_ in requests]
    scores = [np.array([r[1] for r in rows], dtype=np.float32) for rows, *_ in requests]
    excluded = tuple(np.array(sorted(e), dtype=np.int64) + offset for *_, e in requests)
    restaurant = [sku % 7 for sku in skus]
    got = arranged_positions_batch(
        np.concatenate(skus),
        np.concatenate(restaurant),
        np.concatenate(scores),
        np.array([s.size for s in skus], dtype=np.int64),
        num_results=np.array([r[1] for r in requests], dtype=np.int64),
        max_per_restaurant=np.array([r[2] for r in requests], dtype=np.int64),
        exclude=excluded,
    )
    assert len(got) == len(requests)
    for n, (_, wanted, cap, _) in enumerate(requests):
        alone = arranged_positions(
            skus[n],
            restaurant[n],
            scores[n],
            num_results=wanted,
            max_per_restaurant=cap,
            exclude=excluded[n],
        )
        assert got[n].tolist() == alone.tolist()


def test_the_arrange_stage_serves_the_same_items_however_the_batch_is_arranged(
    serving_snapshot: ServingSnapshot,
) -> None:
    """The real stages on the test world: a batch of twelve requests (exclusions, different
    sizes) arranged in one pass serves each request what arranging it on its own serves, and
    what it is served in a batch of its own."""
    tables = serving_snapshot.tables
    requests = tuple(
        Request(
            f"r{n}",
            str(tables.user_ids[n]),
            5 + n,
            Location(float(tables.user_home_lat[n]), float(tables.user_home_lon[n])),
            exclude_sku_ids=tuple(range(n * 40, n * 40 + 60)),
        )
        for n in range(12)
    )
    plan = build_stages().batched
    before = plan[: [s.name for s in plan].index("arrange")]
    ranked = run_stages(before, Batch(requests=requests), serving_snapshot)
    whole = Arrange(one_by_one_up_to=0).run(ranked, serving_snapshot)
    each = Arrange(one_by_one_up_to=len(requests)).run(ranked, serving_snapshot)
    assert [len(i) for i in whole.items] == [r.num_results for r in requests]
    for n, request in enumerate(requests):
        assert np.array_equal(whole.served_positions[n], each.served_positions[n])
        for field in ("sku_ids", "restaurant_ids", "scores"):
            assert np.array_equal(getattr(whole.items[n], field), getattr(each.items[n], field))
        assert not set(whole.items[n].sku_ids.tolist()) & set(request.exclude_sku_ids)
        alone = run_stages(plan, Batch(requests=(request,)), serving_snapshot)
        assert np.array_equal(alone.items[0].sku_ids, whole.items[n].sku_ids)
