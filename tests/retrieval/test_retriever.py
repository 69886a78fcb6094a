from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import recsys.retrieval.retriever as retriever_module
from recsys.artifacts import ArtifactRoot
from recsys.geo import EARTH_RADIUS_KM, haversine_km
from recsys.retrieval.availability import Availability, AvailabilitySelector
from recsys.retrieval.index import ItemIndex, build_index, save_index_version
from recsys.retrieval.retriever import (
    CatalogueGeo,
    RetrievalQuery,
    Retriever,
    cell_of,
    recall_under_filter,
)
from recsys.types import BoolArray, Candidates, Float32Array, Int64Array, Location
from recsys.world import Catalogue

N_RESTAURANTS = 200
PER_RESTAURANT = 20
N_ITEMS = N_RESTAURANTS * PER_RESTAURANT
N_USERS = 300
DIM = 16
NO_VECTOR_USER = N_USERS - 1
CENTRE = Location(52.5, 13.4)


@dataclass(frozen=True)
class World:
    catalogue: Catalogue
    items: Float32Array
    users: Float32Array
    popularity: Float32Array


def clustered(rng: np.random.Generator, n: int, clusters: int) -> Float32Array:
    centres = rng.normal(size=(clusters, DIM))
    return (centres[rng.integers(0, clusters, n)] + 0.4 * rng.normal(size=(n, DIM))).astype(
        np.float32
    )


@pytest.fixture(scope="module")
def world() -> World:
    rng = np.random.default_rng(21)
    r, n = N_RESTAURANTS, N_ITEMS
    catalogue = Catalogue(
        restaurant_lat=rng.uniform(52.35, 52.65, r),  # ~33 km x 40 km around CENTRE
        restaurant_lon=rng.uniform(13.1, 13.7, r),
        restaurant_cuisine=rng.integers(0, 16, r).astype(np.int16),
        restaurant_price_level=rng.integers(1, 5, r).astype(np.int8),
        restaurant_rating=rng.uniform(1, 5, r).astype(np.float32),
        restaurant_is_open=rng.random(r) < 0.95,
        restaurant_district=rng.integers(0, 8, r).astype(np.int16),
        item_restaurant=(np.arange(n) // PER_RESTAURANT).astype(np.int32),
        item_category=rng.integers(0, 5, n).astype(np.int8),
        item_price=rng.uniform(2, 30, n).astype(np.float32),
        item_available=rng.random(n) < 0.95,
    )
    users = clustered(rng, N_USERS, 30)
    users[NO_VECTOR_USER] = 0.0  # a user with a row but no history
    return World(
        catalogue=catalogue,
        items=clustered(rng, n, 30),
        users=users,
        popularity=rng.gamma(1.0, 10.0, n).astype(np.float32),
    )


@pytest.fixture(scope="module", params=["flat", "ivf"])
def index(request: pytest.FixtureRequest, world: World, tmp_path_factory: Any) -> ItemIndex:
    nlist = None if request.param == "flat" else 32
    faiss_index = build_index(world.items, seed=3, nlist=nlist)
    root = ArtifactRoot(tmp_path_factory.mktemp(f"index-{request.param}"))
    version = save_index_version(
        root, faiss_index, world.items, world.users[:50], features_version="f", k=100
    )
    return ItemIndex.load(root.indexes / version, expected_dimension=DIM, expected_count=N_ITEMS)


@pytest.fixture(scope="module")
def flat_index(world: World, tmp_path_factory: Any) -> ItemIndex:
    root = ArtifactRoot(tmp_path_factory.mktemp("index-flat"))
    version = save_index_version(
        root, build_index(world.items), world.items, world.users[:50], features_version="f"
    )
    return ItemIndex.load(root.indexes / version, expected_dimension=DIM, expected_count=N_ITEMS)


def make_retriever(
    world: World,
    index: ItemIndex,
    doc: dict[str, Any] | None = None,
    *,
    radius_in_search: bool = True,
) -> Retriever:
    availability = Availability.from_document(world.catalogue, doc)
    return Retriever(
        index,
        world.users,
        world.catalogue,
        world.popularity,
        availability,
        radius_in_search=radius_in_search,
    )


def eligible(
    world: World,
    availability: Availability,
    location: Location | None,
    radius_km: float,
    exclude: tuple[int, ...] = (),
) -> BoolArray:
    """The eligibility rule computed over the whole catalogue, as a reference."""
    mask = availability.item_mask.copy()
    c = world.catalogue
    if location is not None:
        r = c.item_restaurant
        km = haversine_km(location.lat, location.lon, c.restaurant_lat[r], c.restaurant_lon[r])
        mask &= km <= radius_km
    mask[list(exclude)] = False
    return mask


def exact_top(world: World, user_row: int, mask: BoolArray, k: int) -> Int64Array:
    scores = world.items.astype(np.float64) @ world.users[user_row].astype(np.float64)
    scores[~mask] = -np.inf
    order = np.argsort(-scores, kind="stable")
    return order[: min(k, int(mask.sum()))]


def popular_top(world: World, mask: BoolArray, k: int) -> Int64Array:
    order = np.argsort(-world.popularity, kind="stable")
    return order[mask[order]][:k]


def query(user_row: int, k: int = 20, **kw: Any) -> RetrievalQuery:
    return RetrievalQuery(
        user_row=user_row,
        location=kw.get("location"),
        k=k,
        nprobe=kw.get("nprobe", 16),
        radius_km=kw.get("radius_km", 8.0),
        exclude=kw.get("exclude", ()),
    )


def assert_well_formed(c: Candidates) -> None:
    assert c.sku_ids.dtype == np.int64
    assert c.retrieval_scores.dtype == np.float32
    assert np.unique(c.sku_ids).size == c.sku_ids.size
    assert (np.diff(c.retrieval_scores) <= 0).all()


def test_known_user_without_filters_gets_the_exact_top_k(
    world: World, flat_index: ItemIndex
) -> None:
    retriever = make_retriever(world, flat_index)
    (c,) = retriever.retrieve_batch([query(5, k=30)])
    expected = exact_top(world, 5, retriever.availability.item_mask, 30)
    assert c.sku_ids.tolist() == expected.tolist()
    assert not c.fallback
    assert np.allclose(c.retrieval_scores, world.items[expected] @ world.users[5], atol=1e-4)


def test_radius_and_exclusions_match_a_brute_force_reference(
    world: World, flat_index: ItemIndex
) -> None:
    retriever = make_retriever(world, flat_index)
    near = eligible(world, retriever.availability, CENTRE, 15.0)
    exclude = tuple(int(i) for i in exact_top(world, 7, near, 3))
    (c,) = retriever.retrieve_batch(
        [query(7, k=20, location=CENTRE, radius_km=15.0, exclude=exclude)]
    )
    expected = exact_top(
        world, 7, eligible(world, retriever.availability, CENTRE, 15.0, exclude), 20
    )
    assert c.sku_ids.tolist() == expected.tolist()
    assert not set(exclude) & set(c.sku_ids.tolist())


def test_a_tiny_radius_does_not_starve_the_ranker(world: World, index: ItemIndex) -> None:
    retriever = make_retriever(world, index)
    c = world.catalogue
    restaurant = int(np.flatnonzero(c.restaurant_is_open)[0])
    here = Location(float(c.restaurant_lat[restaurant]), float(c.restaurant_lon[restaurant]))
    mask = eligible(world, retriever.availability, here, 0.4)
    assert 0 < mask.sum() < 60
    k = 15
    # The premise: filtering the over-fetched search results alone leaves too few.
    _, ids = index.search(world.users[[9]], 4 * k, allowed=retriever.availability.selector)
    assert mask[ids[0][ids[0] >= 0]].sum() < k

    for wanted in (k, 200):
        (got,) = retriever.retrieve_batch([query(9, k=wanted, location=here, radius_km=0.4)])
        assert got.sku_ids.size == min(wanted, int(mask.sum()))
        assert mask[got.sku_ids].all()
        assert_well_formed(got)
        # every candidate, searched or topped up, carries the user's inner product
        exact = world.items[got.sku_ids] @ world.users[9]
        assert np.allclose(got.retrieval_scores, exact, atol=1e-4)
        assert not got.fallback


def test_a_heavy_availability_filter_does_not_starve_the_ranker(
    world: World, index: ItemIndex
) -> None:
    doc = {"restaurants_off": list(range(0, N_RESTAURANTS - 12))}
    retriever = make_retriever(world, index, doc)
    mask = retriever.availability.item_mask
    k = 100
    assert mask.sum() > k
    (got,) = retriever.retrieve_batch([query(11, k=k, nprobe=1)])
    assert got.sku_ids.size == k
    assert mask[got.sku_ids].all()
    assert_well_formed(got)
    if index.nlist:
        # IVF with one probed list sees only a few allowed items: the top-up did the rest.
        _, ids = index.search(
            world.users[[11]], k, nprobe=1, allowed=retriever.availability.selector
        )
        assert (ids[0] >= 0).sum() < k


def test_unknown_user_gets_popular_items_near_the_location(world: World, index: ItemIndex) -> None:
    retriever = make_retriever(world, index, {"skus_off": [0, 1, 2]})
    exclude = tuple(int(i) for i in popular_top(world, retriever.availability.item_mask, 2))
    (c,) = retriever.retrieve_batch(
        [query(-1, k=25, location=CENTRE, radius_km=6.0, exclude=exclude)]
    )
    mask = eligible(world, retriever.availability, CENTRE, 6.0, exclude)
    assert c.fallback
    assert c.sku_ids.tolist() == popular_top(world, mask, 25).tolist()
    assert np.array_equal(c.retrieval_scores, world.popularity[c.sku_ids])


def test_unknown_user_without_location_gets_globally_popular_items(
    world: World, index: ItemIndex
) -> None:
    retriever = make_retriever(world, index)
    (c,) = retriever.retrieve_batch([query(-1, k=40)])
    assert c.fallback
    assert c.sku_ids.tolist() == popular_top(world, retriever.availability.item_mask, 40).tolist()


def test_a_user_without_a_vector_is_served_like_an_unknown_user(
    world: World, index: ItemIndex
) -> None:
    retriever = make_retriever(world, index)
    unknown, no_vector = retriever.retrieve_batch(
        [query(-1, location=CENTRE), query(NO_VECTOR_USER, location=CENTRE)]
    )
    assert no_vector.fallback
    assert np.array_equal(no_vector.sku_ids, unknown.sku_ids)


def mixed_queries() -> list[RetrievalQuery]:
    west = Location(52.45, 13.2)
    return [
        query(3, k=20),
        query(-1, k=10, location=west),
        query(4, k=50, location=CENTRE, radius_km=5.0),
        query(5, k=5, exclude=(1, 2, 3)),
        query(6, k=30, nprobe=4, location=west, radius_km=3.0),
        query(NO_VECTOR_USER, k=12),
        query(7, k=200, nprobe=4),
        query(-1, k=7),
        query(8, k=1, location=CENTRE, radius_km=0.5),
        query(3, k=20, location=west),
    ]


def test_a_mixed_batch_answers_exactly_like_one_query_at_a_time(
    world: World, index: ItemIndex
) -> None:
    retriever = make_retriever(world, index, {"restaurants_off": [1, 2, 3]})
    queries = mixed_queries()
    batched = retriever.retrieve_batch(queries)
    assert len(batched) == len(queries)
    for q, b in zip(queries, batched, strict=True):
        (alone,) = retriever.retrieve_batch([q])
        assert b.sku_ids.tolist() == alone.sku_ids.tolist(), q
        assert np.allclose(b.retrieval_scores, alone.retrieval_scores, atol=1e-5)
        assert b.fallback == alone.fallback


def test_a_batch_checks_the_radius_of_all_its_searches_at_once(
    world: World, index: ItemIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    retriever = make_retriever(world, index)
    queries = mixed_queries()
    checked: list[tuple[int, tuple[int, ...]]] = []
    within_rows = retriever._within_rows

    def counting(queries: list[RetrievalQuery], ids: Int64Array) -> BoolArray:
        checked.append((len(queries), ids.shape))
        return within_rows(queries, ids)

    monkeypatch.setattr(retriever, "_within_rows", counting)
    retriever.retrieve_batch(queries)
    # The known users' rows of every search in one check, as wide as the deepest search;
    # anything after it is a deeper search of one query (its own check).
    known = sum(1 for q in queries if retriever._is_known(q))
    rows, shape = checked[0]
    assert rows == known
    assert shape[0] == known
    assert all(n == 1 for n, _ in checked[1:]), checked


@dataclasses.dataclass
class CountingIndex(ItemIndex):
    """The real index, recording each search call's batch size, k and nprobe."""

    calls: list[tuple[int, int, int | None]] = dataclasses.field(default_factory=list)

    def search(
        self,
        queries: Float32Array,
        k: int,
        *,
        nprobe: int | None = None,
        allowed: AvailabilitySelector | None = None,
    ) -> tuple[Float32Array, Int64Array]:
        self.calls.append((int(queries.shape[0]), k, nprobe))
        return super().search(queries, k, nprobe=nprobe, allowed=allowed)


def test_one_search_per_batch_nprobe_and_delivery_cell(world: World, index: ItemIndex) -> None:
    fields = {f.name: getattr(index, f.name) for f in dataclasses.fields(ItemIndex) if f.init}
    counting = CountingIndex(**fields)
    retriever = make_retriever(world, counting)
    queries = mixed_queries()
    retriever.retrieve_batch(queries)
    # Without a location, one search per nprobe (users 3 and 5; user 7); with one, one search
    # per (nprobe, cell, radius), as deep as the cell's share beyond the radius needs.
    fetch = {i: retriever._fetch(queries[i], cell_of(queries[i].location)) for i in (2, 4, 8, 9)}  # type: ignore[arg-type]
    first = [(2, 20, 16), (1, fetch[2], 16), (1, fetch[4], 4), (1, 200, 4), (1, fetch[8], 16)]
    first.append((1, fetch[9], 16))
    calls = list(counting.calls)
    for call in first:
        calls.remove(call)
    # Anything else is a deeper search for a query whose radius left too few of a full result.
    assert all(n == 1 and k > min(fetch.values()) for n, k, _ in calls), calls
    assert all(f < 8 * (q.k + len(q.exclude)) for f, q in ((fetch[i], queries[i]) for i in (2, 9)))


def test_one_search_per_batch_and_nprobe_with_the_radius_after_the_search(
    world: World, index: ItemIndex
) -> None:
    fields = {f.name: getattr(index, f.name) for f in dataclasses.fields(ItemIndex) if f.init}
    counting = CountingIndex(**fields)
    retriever = make_retriever(world, counting, radius_in_search=False)
    retriever.retrieve_batch(mixed_queries())
    # 7 known users with vectors: 5 at nprobe 16, 2 at nprobe 4, each search as deep as the
    # deepest query of its group needs (k 50 with a location; k 30 with a location vs k 200)
    overfetch = retriever_module.RADIUS_OVERFETCH
    assert sorted(counting.calls) == [(2, max(30 * overfetch, 200), 4), (5, 50 * overfetch, 16)]


def test_nprobe_zero_searches_with_the_index_default(world: World, index: ItemIndex) -> None:
    fields = {f.name: getattr(index, f.name) for f in dataclasses.fields(ItemIndex) if f.init}
    counting = CountingIndex(**fields)
    retriever = make_retriever(world, counting)
    (default,) = retriever.retrieve_batch([query(3, nprobe=0)])
    assert counting.calls[-1][2] == index.default_nprobe
    (explicit,) = retriever.retrieve_batch([query(3, nprobe=max(index.default_nprobe, 1))])
    assert default.sku_ids.tolist() == explicit.sku_ids.tolist()


def test_nprobe_zero_searches_with_the_index_setting_for_the_query_depth(
    world: World, index: ItemIndex
) -> None:
    fields = {f.name: getattr(index, f.name) for f in dataclasses.fields(ItemIndex) if f.init}
    counting = CountingIndex(**{**fields, "nprobe_by_k": {10: 1, 60: 3}, "default_nprobe": 5})
    retriever = make_retriever(world, counting)
    for k, nprobe in ((5, 1), (10, 1), (30, 3), (60, 3), (80, 5)):
        (default,) = retriever.retrieve_batch([query(3, k=k, nprobe=0)])
        assert counting.calls[-1][2] == nprobe
        (explicit,) = retriever.retrieve_batch([query(3, k=k, nprobe=nprobe)])
        assert default.sku_ids.tolist() == explicit.sku_ids.tolist()


def test_a_new_availability_snapshot_leaves_the_old_retriever_serving(
    world: World, index: ItemIndex
) -> None:
    before = make_retriever(world, index)
    (c,) = before.retrieve_batch([query(12, k=10)])
    top = int(c.sku_ids[0])
    after = before.with_availability(
        Availability.from_document(world.catalogue, {"skus_off": [top]})
    )
    (c_after,) = after.retrieve_batch([query(12, k=10)])
    assert top not in c_after.sku_ids.tolist()
    (c_before,) = before.retrieve_batch([query(12, k=10)])
    assert int(c_before.sku_ids[0]) == top


def test_retrievers_of_two_availability_snapshots_each_serve_their_own_in_one_cell(
    world: World, index: ItemIndex
) -> None:
    """The cell's selector is kept for one availability at a time: calls that alternate between
    two snapshots' retrievers (sharing the cells) each filter by their own snapshot."""
    located = query(12, k=10, location=CENTRE, radius_km=8.0)
    before = make_retriever(world, index)
    (c,) = before.retrieve_batch([located])
    top = int(c.sku_ids[0])
    after = before.with_availability(
        Availability.from_document(world.catalogue, {"skus_off": [top]})
    )
    assert after.cells is before.cells
    for _ in range(2):
        (c_after,) = after.retrieve_batch([located])
        assert top not in c_after.sku_ids.tolist()
        (c_before,) = before.retrieve_batch([located])
        assert int(c_before.sku_ids[0]) == top
    cell = cell_of(CENTRE)
    shared = after.cells.get(cell, 8.0, after.availability)
    assert after.cells.get(cell, 8.0, after.availability) is shared  # kept while unchanged
    near = np.unpackbits(after.cells.near(cell, 8.0), bitorder="little")[: world.catalogue.n_items]
    allowed = np.unpackbits(shared.bitmap, bitorder="little")[: world.catalogue.n_items]
    assert np.array_equal(allowed, near & after.availability.item_mask)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (query(N_USERS), r"user_row: expected -1 \(unknown\) or 0\.\.299, got 300"),
        (query(-2), "user_row"),
        (query(1, k=0), "k: expected >= 1 candidates, got 0"),
        (query(1, nprobe=-1), "nprobe: expected >= 1, or 0 for the index default, got -1"),
        (query(1, location=CENTRE, radius_km=0.0), "radius_km: expected a positive distance"),
        (query(1, location=CENTRE, radius_km=float("nan")), "radius_km"),
    ],
)
def test_invalid_queries_are_rejected(
    world: World, flat_index: ItemIndex, bad: RetrievalQuery, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_retriever(world, flat_index).retrieve_batch([bad])


def test_mismatched_inputs_are_rejected(world: World, flat_index: ItemIndex) -> None:
    availability = Availability.from_document(world.catalogue, None)
    with pytest.raises(ValueError, match=r"user_vectors: expected shape \[users, 16\]"):
        Retriever(flat_index, world.users[:, :8], world.catalogue, world.popularity, availability)
    with pytest.raises(ValueError, match="item_popularity: expected 4000 items"):
        Retriever(flat_index, world.users, world.catalogue, world.popularity[:10], availability)


PROPERTY = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
locations = st.one_of(
    st.none(),
    st.builds(Location, st.floats(52.35, 52.65), st.floats(13.1, 13.7)),
)


@PROPERTY
@given(
    user_row=st.integers(-1, N_USERS - 1),
    location=locations,
    radius_km=st.floats(0.2, 25.0),
    k=st.integers(1, 120),
    nprobe=st.sampled_from([1, 4, 16]),
    exclude=st.lists(st.integers(0, N_ITEMS - 1), max_size=30),
    restaurants_off=st.lists(st.integers(0, N_RESTAURANTS - 1), max_size=150),
)
def test_no_returned_item_is_ever_ineligible(
    world: World,
    index: ItemIndex,
    user_row: int,
    location: Location | None,
    radius_km: float,
    k: int,
    nprobe: int,
    exclude: list[int],
    restaurants_off: list[int],
) -> None:
    retriever = make_retriever(world, index, {"restaurants_off": restaurants_off})
    q = RetrievalQuery(user_row, location, k, nprobe, radius_km, tuple(exclude))
    (c,) = retriever.retrieve_batch([q])
    mask = eligible(world, retriever.availability, location, radius_km, tuple(exclude))
    assert mask[c.sku_ids].all()
    assert c.sku_ids.size == min(k, int(mask.sum()))
    assert_well_formed(c)
    personal = user_row >= 0 and user_row != NO_VECTOR_USER
    assert c.fallback == (not personal)
    if personal:
        exact = world.items[c.sku_ids] @ world.users[user_row]
        assert np.allclose(c.retrieval_scores, exact, atol=1e-4)
    else:
        assert np.array_equal(c.retrieval_scores, world.popularity[c.sku_ids])


@PROPERTY
@given(
    user_row=st.sampled_from([-1, 17, 18]),
    location=st.builds(Location, st.floats(52.35, 52.65), st.floats(13.1, 13.7)),
    radius_km=st.floats(0.2, 12.0),
    k=st.integers(1, 120),
    exclude=st.lists(st.integers(0, N_ITEMS - 1), max_size=30),
    scan=st.sampled_from([(16, 64), (64, 1024), (256, 256)]),
)
def test_the_nearby_restaurant_top_up_agrees_with_the_full_scan(
    world: World,
    flat_index: ItemIndex,
    monkeypatch: pytest.MonkeyPatch,
    user_row: int,
    location: Location,
    radius_km: float,
    k: int,
    exclude: list[int],
    scan: tuple[int, int],
) -> None:
    """Cutting the popularity scan short (and reading nearby restaurants' items instead)
    changes nothing in what is returned: same items, same order."""
    retriever = make_retriever(world, flat_index, {"restaurants_off": [5, 6, 7]})
    q = RetrievalQuery(user_row, location, k, 16, radius_km, tuple(exclude))
    monkeypatch.setattr(retriever_module, "TOPUP_SCAN_LIMIT", N_ITEMS)
    (full,) = retriever.retrieve_batch([q])
    monkeypatch.setattr(retriever_module, "TOPUP_FIRST_SCAN", scan[0])
    monkeypatch.setattr(retriever_module, "TOPUP_SCAN_LIMIT", scan[1])
    (cut,) = retriever.retrieve_batch([q])
    assert cut.sku_ids.tolist() == full.sku_ids.tolist()
    if user_row < 0:
        mask = eligible(world, retriever.availability, location, radius_km, tuple(exclude))
        assert full.sku_ids.tolist() == popular_top(world, mask, k).tolist()


def catalogue_at(lat: npt.NDArray[np.float64], lon: npt.NDArray[np.float64]) -> Catalogue:
    """One item per restaurant at the given places; the other columns do not matter here."""
    r = lat.size
    return Catalogue(
        restaurant_lat=lat,
        restaurant_lon=lon,
        restaurant_cuisine=np.zeros(r, np.int16),
        restaurant_price_level=np.ones(r, np.int8),
        restaurant_rating=np.ones(r, np.float32),
        restaurant_is_open=np.ones(r, np.bool_),
        restaurant_district=np.zeros(r, np.int16),
        item_restaurant=np.arange(r, dtype=np.int32),
        item_category=np.zeros(r, np.int8),
        item_price=np.ones(r, np.float32),
        item_available=np.ones(r, np.bool_),
    )


@pytest.fixture(scope="module")
def globe() -> CatalogueGeo:
    """Restaurants all over the sphere, plus crowds at a pole, the antimeridian and a city."""
    rng = np.random.default_rng(5)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, 3000)))
    lon = rng.uniform(-180, 180, 3000)
    lat = np.concatenate(
        [lat, rng.uniform(88, 90, 300), rng.uniform(-60, 60, 300), 52.5 + rng.normal(0, 0.05, 500)]
    )
    lon = np.concatenate(
        [
            lon,
            rng.uniform(-180, 180, 300),
            rng.choice([-1, 1], 300) * rng.uniform(179.5, 180, 300),
            13.4 + rng.normal(0, 0.08, 500),
        ]
    )
    return CatalogueGeo(catalogue_at(lat, lon), np.arange(lat.size, dtype=np.int32))


@settings(max_examples=300, deadline=None)
@given(
    lat=st.one_of(st.floats(-90, 90), st.floats(88, 90), st.floats(52.3, 52.7)),
    lon=st.one_of(
        st.floats(-180, 180), st.floats(179, 180), st.floats(-180, -179), st.floats(13.2, 13.6)
    ),
    radius_km=st.one_of(st.floats(0.05, 30.0), st.floats(30.0, 20_000.0)),
)
def test_restaurants_near_finds_exactly_those_within_the_radius(
    globe: CatalogueGeo, lat: float, lon: float, radius_km: float
) -> None:
    c = globe.catalogue
    found = globe.restaurants_near(Location(lat, lon), radius_km)
    expected = np.flatnonzero(
        haversine_km(lat, lon, c.restaurant_lat, c.restaurant_lon) <= radius_km
    )
    assert sorted(found.tolist()) == expected.tolist()
    items = globe.items_near(Location(lat, lon), radius_km)
    assert sorted(items.tolist()) == expected.tolist()  # one item per restaurant here


def destinations(
    lat: float, lon: float, km: npt.NDArray[np.float64], bearing: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The points ``km`` away from (lat, lon) along ``bearing`` (radians), in degrees."""
    p1, l1, d = np.radians(lat), np.radians(lon), km / EARTH_RADIUS_KM
    p2 = np.arcsin(np.sin(p1) * np.cos(d) + np.cos(p1) * np.sin(d) * np.cos(bearing))
    l2 = l1 + np.arctan2(
        np.sin(bearing) * np.sin(d) * np.cos(p1), np.cos(d) - np.sin(p1) * np.sin(p2)
    )
    return np.degrees(p2), (np.degrees(l2) + 540.0) % 360.0 - 180.0


@settings(max_examples=200, deadline=None)
@given(
    lat=st.one_of(st.floats(-89.9, 89.9), st.floats(52.3, 52.7)),
    lon=st.floats(-180, 180),
    radius_km=st.one_of(st.floats(0.01, 30.0), st.floats(30.0, 20_000.0)),
    seed=st.integers(0, 2**32 - 1),
)
def test_within_decides_exactly_as_haversine_even_a_hair_from_the_radius(
    globe: CatalogueGeo, lat: float, lon: float, radius_km: float, seed: int
) -> None:
    """The dot-product radius check agrees with ``haversine_km(...) <= radius`` for every
    item, including restaurants placed within rounding of the radius (where it falls back to
    haversine itself), one place at a time and a batch of places at once."""
    rng = np.random.default_rng(seed)
    scale = rng.choice([0.0, 1e-15, 1e-13, 1e-11, 1e-9, 1e-6, 1e-3], 400)
    km = radius_km * (1.0 + scale * rng.choice([-1.0, 1.0], 400))
    edge_lat, edge_lon = destinations(lat, lon, km, rng.uniform(0, 2 * np.pi, 400))
    c = globe.catalogue
    geo = CatalogueGeo(
        catalogue_at(
            np.concatenate([c.restaurant_lat, edge_lat]),
            np.concatenate([c.restaurant_lon, edge_lon]),
        ),
        np.arange(c.n_restaurants + 400, dtype=np.int32),
    )
    ids = np.arange(geo.catalogue.n_items)
    truth = (
        haversine_km(lat, lon, geo.catalogue.restaurant_lat, geo.catalogue.restaurant_lon)
        <= radius_km
    )
    assert truth[-400:].any()  # the edge straddles the radius
    assert not truth[-400:].all()
    assert geo.within(lat, lon, radius_km, ids).tolist() == truth.tolist()
    places = np.array([[lat, lon], [52.5, 13.4], [-lat, lon]])
    radii = np.array([radius_km, 8.0, radius_km / 2])
    rows = np.stack([ids, ids[::-1], ids])
    batch = geo.within(places[:, 0], places[:, 1], radii, rows)
    for n in range(3):
        expected = haversine_km(
            places[n, 0],
            places[n, 1],
            geo.catalogue.restaurant_lat[rows[n]],
            geo.catalogue.restaurant_lon[rows[n]],
        )
        assert batch[n].tolist() == (expected <= radii[n]).tolist()


CELL = retriever_module.CELL_DEG
border = st.integers(math.ceil(52.35 / CELL), math.floor(52.65 / CELL)).map(lambda i: i * CELL)
"""Latitudes / longitudes on the delivery-cell borders inside the test world."""
nudge = st.sampled_from([-1e-9, 0.0, 1e-9, -1e-6, 1e-6])


@PROPERTY
@given(
    user_row=st.integers(0, N_USERS - 2),
    lat=border,
    lon=st.integers(math.ceil(13.1 / CELL), math.floor(13.7 / CELL)).map(lambda i: i * CELL),
    nudges=st.tuples(nudge, nudge),
    radius_km=st.one_of(st.floats(0.2, 3.0), st.floats(3.0, 20.0)),
    k=st.integers(1, 150),
    exclude=st.lists(st.integers(0, N_ITEMS - 1), max_size=10),
    restaurants_off=st.lists(st.integers(0, N_RESTAURANTS - 1), max_size=100),
)
def test_at_cell_borders_the_in_search_radius_is_exact_on_a_flat_index(
    world: World,
    flat_index: ItemIndex,
    user_row: int,
    lat: float,
    lon: float,
    nudges: tuple[float, float],
    radius_km: float,
    k: int,
    exclude: list[int],
    restaurants_off: list[int],
) -> None:
    """On and either side of a cell border (where a request's cell changes), the radius filtered
    inside the search serves exactly the true top-k of the eligible items, nothing else."""
    here = Location(lat + nudges[0], lon + nudges[1])
    retriever = make_retriever(world, flat_index, {"restaurants_off": restaurants_off})
    q = RetrievalQuery(user_row, here, k, 0, radius_km, tuple(exclude))
    (c,) = retriever.retrieve_batch([q])
    mask = eligible(world, retriever.availability, here, radius_km, tuple(exclude))
    assert mask[c.sku_ids].all()
    assert c.sku_ids.size == min(k, int(mask.sum()))
    if q.user_row != NO_VECTOR_USER:
        expected = exact_top(world, user_row, mask, k)
        assert set(c.sku_ids.tolist()) == set(expected.tolist())


@settings(max_examples=300, deadline=None)
@given(
    lat=st.floats(-80, 80),
    lon=st.floats(-179, 179),
    within=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    radius_km=st.floats(0.05, 50.0),
    bearing=st.floats(0, 2 * np.pi),
    share=st.floats(0, 1),
)
def test_a_cells_reach_covers_the_radius_around_every_point_of_the_cell(
    lat: float,
    lon: float,
    within: tuple[float, float],
    radius_km: float,
    bearing: float,
    share: float,
) -> None:
    cell = retriever_module.cell_of(Location(lat, lon))
    step = retriever_module.CELL_DEG
    point = Location((cell[0] + within[0]) * step, (cell[1] + within[1]) * step)
    # A place ``share * radius`` away from the point, in any direction (small-angle offsets).
    km = share * radius_km
    dlat = np.degrees(km * np.cos(bearing) / 6371.0088)
    dlon = np.degrees(km * np.sin(bearing) / 6371.0088) / np.cos(np.radians(point.lat))
    there = (point.lat + dlat, point.lon + dlon)
    assume(haversine_km(point.lat, point.lon, *there) <= radius_km)  # the offset may overshoot
    centre, reach = retriever_module.cell_reach_km(cell, radius_km)
    assert haversine_km(centre.lat, centre.lon, *there) <= reach


def test_recall_under_filter_against_a_brute_force_reference(
    world: World, index: ItemIndex
) -> None:
    """The build's quality measure: exact search is recall 1 under the filter; an IVF index
    probing one list of 32 is not, and probing all of them is again exact."""
    retriever = make_retriever(world, index, {"restaurants_off": [0, 1, 2, 3]})
    rows = np.arange(40, dtype=np.int64)
    rng = np.random.default_rng(5)
    places = [Location(*rng.uniform((52.4, 13.2), (52.6, 13.6))) for _ in rows]
    measured = recall_under_filter(
        retriever, world.items, rows, places, k=30, radius_km=8.0, nprobes=[1, 32]
    )

    # the reference: exact top 30 over the eligible items, one query at a time
    def recall_of(nprobe: int) -> float:
        hits = total = 0
        for row, place in zip(rows.tolist(), places, strict=True):
            top = exact_top(world, row, eligible(world, retriever.availability, place, 8.0), 30)
            q = RetrievalQuery(user_row=row, location=place, k=30, nprobe=nprobe, radius_km=8.0)
            hits += int(np.isin(top, retriever.retrieve_batch([q])[0].sku_ids).sum())
            total += top.size
        return hits / total

    assert measured == pytest.approx({1: recall_of(1), 32: recall_of(32)})
    assert measured[32] == 1.0
    if index.nlist:
        assert measured[1] < 0.95
    with pytest.raises(ValueError, match="places: expected one per user"):
        recall_under_filter(retriever, world.items, rows, places[:3], k=30, radius_km=8.0,
                            nprobes=[1])  # fmt: skip
