from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recsys.serving.validation import MAX_EXCLUDE_SKU_IDS, InvalidRequest, validate_request
from recsys.types import Location
from recsys.v1 import recommender_pb2


def test_defaults_are_filled() -> None:
    request = validate_request(
        recommender_pb2.RecommendRequest(user_id="u1"), hour=9, make_request_id=lambda: "rid"
    )
    assert request.request_id == "rid"
    assert request.num_results == 20
    assert request.surface == "home"
    assert request.location is None
    assert request.exclude_sku_ids == ()
    assert request.hour == 9


def test_given_fields_are_kept() -> None:
    message = recommender_pb2.RecommendRequest(
        user_id="u1",
        num_results=200,
        location=recommender_pb2.Location(lat=-90.0, lon=180.0),
        surface="search",
        request_id="abc",
        exclude_sku_ids=[0, 5, 7],
        platform="ios",
    )
    request = validate_request(message)
    assert request.request_id == "abc"
    assert request.num_results == 200
    assert request.location == Location(lat=-90.0, lon=180.0)
    assert request.surface == "search"
    assert request.platform == "ios"
    assert request.exclude_sku_ids == (0, 5, 7)


def test_generated_request_ids_are_uuid4_hex_and_distinct() -> None:
    message = recommender_pb2.RecommendRequest(user_id="u1")
    first, second = validate_request(message), validate_request(message)
    assert len(first.request_id) == 32
    int(first.request_id, 16)
    assert first.request_id != second.request_id


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (recommender_pb2.RecommendRequest(user_id=""), "user_id"),
        (recommender_pb2.RecommendRequest(user_id="x" * 129), "user_id"),
        (recommender_pb2.RecommendRequest(user_id="é" * 65), "user_id"),  # 130 bytes
        (recommender_pb2.RecommendRequest(user_id="u", num_results=-1), "num_results"),
        (recommender_pb2.RecommendRequest(user_id="u", num_results=201), "num_results"),
        (
            recommender_pb2.RecommendRequest(
                user_id="u", location=recommender_pb2.Location(lat=90.5, lon=0)
            ),
            "location.lat",
        ),
        (
            recommender_pb2.RecommendRequest(
                user_id="u", location=recommender_pb2.Location(lat=0, lon=-180.01)
            ),
            "location.lon",
        ),
        (
            recommender_pb2.RecommendRequest(
                user_id="u", location=recommender_pb2.Location(lat=math.nan, lon=0)
            ),
            "location.lat",
        ),
        (
            recommender_pb2.RecommendRequest(
                user_id="u", location=recommender_pb2.Location(lat=0, lon=math.inf)
            ),
            "location.lon",
        ),
        (
            recommender_pb2.RecommendRequest(user_id="u", exclude_sku_ids=[1, -3]),
            "exclude_sku_ids[1]",
        ),
        (
            recommender_pb2.RecommendRequest(
                user_id="u", exclude_sku_ids=range(MAX_EXCLUDE_SKU_IDS + 1)
            ),
            "exclude_sku_ids",
        ),
        (recommender_pb2.RecommendRequest(user_id="u", surface="s" * 65), "surface"),
        (recommender_pb2.RecommendRequest(user_id="u", platform="p" * 65), "platform"),
        (recommender_pb2.RecommendRequest(user_id="u", request_id="r" * 129), "request_id"),
    ],
)
def test_bad_input_names_the_field(message: recommender_pb2.RecommendRequest, field: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        validate_request(message)
    assert raised.value.field == field
    assert str(raised.value).startswith(f"{field}: ")
    assert "expected" in str(raised.value)


def test_the_longest_lists_and_ids_are_accepted() -> None:
    message = recommender_pb2.RecommendRequest(
        user_id="x" * 128, exclude_sku_ids=range(MAX_EXCLUDE_SKU_IDS)
    )
    assert len(validate_request(message).exclude_sku_ids) == MAX_EXCLUDE_SKU_IDS


coordinates = st.floats(allow_nan=True, allow_infinity=True)


@given(lat=coordinates, lon=coordinates)
def test_a_location_is_accepted_exactly_when_finite_and_in_range(lat: float, lon: float) -> None:
    message = recommender_pb2.RecommendRequest(
        user_id="u", location=recommender_pb2.Location(lat=lat, lon=lon)
    )
    valid = math.isfinite(lat) and math.isfinite(lon) and abs(lat) <= 90 and abs(lon) <= 180
    if valid:
        assert validate_request(message).location == Location(lat=lat, lon=lon)
    else:
        with pytest.raises(InvalidRequest, match="location"):
            validate_request(message)


@given(num_results=st.integers(min_value=-(2**31), max_value=2**31 - 1))
def test_num_results_is_accepted_exactly_in_0_to_200(num_results: int) -> None:
    message = recommender_pb2.RecommendRequest(user_id="u", num_results=num_results)
    if 0 <= num_results <= 200:
        assert validate_request(message).num_results == (num_results or 20)
    else:
        with pytest.raises(InvalidRequest, match="num_results"):
            validate_request(message)


@given(ids=st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=50))
def test_exclusions_are_accepted_exactly_when_none_is_negative(ids: list[int]) -> None:
    message = recommender_pb2.RecommendRequest(user_id="u", exclude_sku_ids=ids)
    if all(i >= 0 for i in ids):
        assert validate_request(message).exclude_sku_ids == tuple(ids)
    else:
        first_negative = next(n for n, i in enumerate(ids) if i < 0)
        with pytest.raises(InvalidRequest) as raised:
            validate_request(message)
        assert raised.value.field == f"exclude_sku_ids[{first_negative}]"


def test_a_request_may_name_its_own_hour_and_otherwise_gets_the_clocks() -> None:
    unset = recommender_pb2.RecommendRequest(user_id="u1")
    assert validate_request(unset, hour=7).hour == 7
    midnight = recommender_pb2.RecommendRequest(user_id="u1", hour=0)
    assert validate_request(midnight, hour=7).hour == 0
    with pytest.raises(InvalidRequest, match="hour"):
        validate_request(recommender_pb2.RecommendRequest(user_id="u1", hour=24), hour=7)
