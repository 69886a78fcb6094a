from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.retrieval.availability import Availability, AvailabilitySelector
from recsys.world import Catalogue

N_RESTAURANTS = 50
PER_RESTAURANT = 7  # 350 items: not a multiple of 8, so the bitmap's last byte is partial


def make_catalogue(seed: int = 0) -> Catalogue:
    rng = np.random.default_rng(seed)
    r, n = N_RESTAURANTS, N_RESTAURANTS * PER_RESTAURANT
    return Catalogue(
        restaurant_lat=rng.uniform(52.4, 52.6, r),
        restaurant_lon=rng.uniform(13.2, 13.6, r),
        restaurant_cuisine=rng.integers(0, 16, r).astype(np.int16),
        restaurant_price_level=rng.integers(1, 5, r).astype(np.int8),
        restaurant_rating=rng.uniform(1, 5, r).astype(np.float32),
        restaurant_is_open=rng.random(r) < 0.9,
        restaurant_district=rng.integers(0, 5, r).astype(np.int16),
        item_restaurant=(np.arange(n) // PER_RESTAURANT).astype(np.int32),
        item_category=rng.integers(0, 5, n).astype(np.int8),
        item_price=rng.uniform(2, 30, n).astype(np.float32),
        item_available=rng.random(n) < 0.95,
    )


CATALOGUE = make_catalogue()


def reference_mask(catalogue: Catalogue, skus_off: list[int], restaurants_off: list[int]) -> Any:
    """The rule, item by item, in plain Python."""
    out = []
    for sku in range(catalogue.n_items):
        restaurant = int(catalogue.item_restaurant[sku])
        out.append(
            bool(catalogue.item_available[sku])
            and bool(catalogue.restaurant_is_open[restaurant])
            and sku not in skus_off
            and restaurant not in restaurants_off
        )
    return np.array(out)


@settings(max_examples=50)
@given(
    st.lists(st.integers(0, N_RESTAURANTS * PER_RESTAURANT - 1), max_size=40),
    st.lists(st.integers(0, N_RESTAURANTS - 1), max_size=10),
)
def test_mask_combines_catalogue_and_document(
    skus_off: list[int], restaurants_off: list[int]
) -> None:
    availability = Availability.from_document(
        CATALOGUE, {"skus_off": skus_off, "restaurants_off": restaurants_off}
    )
    expected = reference_mask(CATALOGUE, skus_off, restaurants_off)
    assert np.array_equal(availability.item_mask, expected)
    assert availability.n_available == int(expected.sum())
    assert availability.skus_off.tolist() == sorted(set(skus_off))


@settings(max_examples=100)
@given(st.lists(st.booleans(), min_size=1, max_size=70))
def test_faiss_selector_selects_exactly_the_mask(bits: list[bool]) -> None:
    mask = np.array(bits, dtype=np.bool_)
    selector: Any = AvailabilitySelector(mask).faiss_selector  # the stub omits is_member
    assert [selector.is_member(i) for i in range(mask.size)] == bits
    assert not selector.is_member(len(bits) + 8)  # past the bitmap: never selected


def test_empty_or_missing_document_serves_the_catalogue_as_is() -> None:
    base = reference_mask(CATALOGUE, [], [])
    docs: tuple[dict[str, list[int]] | None, ...] = (
        None,
        {},
        {"skus_off": [], "restaurants_off": []},
    )
    for doc in docs:
        availability = Availability.from_document(CATALOGUE, doc)
        assert np.array_equal(availability.item_mask, base)


def test_snapshot_is_immutable_and_versioned_by_content() -> None:
    before = (CATALOGUE.item_available.copy(), CATALOGUE.restaurant_is_open.copy())
    a = Availability.from_document(CATALOGUE, {"skus_off": [3, 1], "restaurants_off": [2]})
    b = Availability.from_document(CATALOGUE, {"skus_off": [1, 3, 3], "restaurants_off": [2]})
    c = Availability.from_document(CATALOGUE, {"skus_off": [1]})
    assert a.version == b.version
    assert a.version != c.version
    assert len(a.version) == 12
    with pytest.raises(ValueError, match="read-only"):
        a.item_mask[0] = True
    assert np.array_equal(CATALOGUE.item_available, before[0])  # the catalogue is untouched
    assert np.array_equal(CATALOGUE.restaurant_is_open, before[1])


def test_switching_off_a_restaurant_switches_off_its_items() -> None:
    availability = Availability.from_document(CATALOGUE, {"restaurants_off": [4]})
    items = np.flatnonzero(CATALOGUE.item_restaurant == 4)
    assert not availability.item_mask[items].any()


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"skus_off": [1, "7"]}, r"availability\.skus_off: '7' is not an integer id"),
        ({"skus_off": [2.0]}, r"availability\.skus_off: 2\.0 is not an integer id"),
        ({"skus_off": [True]}, r"availability\.skus_off: True is not an integer id"),
        ({"skus_off": [5, 350]}, r"skus_off: id 350 is out of range, expected 0\.\.349"),
        ({"skus_off": [-1]}, r"availability\.skus_off: id -1 is out of range"),
        ({"restaurants_off": [50]}, r"restaurants_off: id 50 is out of range, expected 0\.\.49"),
        ({"restaurants_off": 3}, r"availability\.restaurants_off: expected a list of ids, got int"),
        ({"skus_of": [1]}, r"availability: unknown field 'skus_of'"),
    ],
)  # fmt: skip
def test_invalid_documents_are_rejected_with_the_field_and_id(
    doc: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Availability.from_document(CATALOGUE, doc)


def test_a_non_object_document_is_rejected() -> None:
    bad: Any = ["skus_off"]
    with pytest.raises(ValueError, match="availability: expected a JSON object, got list"):
        Availability.from_document(CATALOGUE, bad)
