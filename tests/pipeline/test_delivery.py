"""Deliverability on the real batched stages: every served item can be delivered to where the
request delivers to, whether the request names a location or not."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.geo import haversine_km
from recsys.pipeline.snapshot import ServingSnapshot
from recsys.pipeline.stages import build_stages
from recsys.retrieval.stage import NO_LOCATION, UNKNOWN_USER
from recsys.serving.pipeline import Job, recommend_batch
from recsys.types import Assignment, Location, PipelineParams, Recommendation, Request

RADIUS_KM = 3.0
STAGES = build_stages().batched


@pytest.fixture(scope="module")
def state(serving_snapshot: ServingSnapshot) -> ServingSnapshot:
    return serving_snapshot


def _serve(state: ServingSnapshot, user: str, location: Location | None) -> Recommendation:
    request = Request(request_id="r", user_id=user, num_results=20, location=location)
    params = PipelineParams(max_per_restaurant=100, radius_km=RADIUS_KM)
    (rec,) = recommend_batch([Job(request, Assignment((), params, "1"), state)], STAGES)
    assert isinstance(rec, Recommendation), rec
    return rec


def _km(state: ServingSnapshot, rec: Recommendation, lat: float, lon: float) -> np.ndarray:
    c = state.tables.catalogue
    restaurants = c.item_restaurant[rec.items.sku_ids]
    return haversine_km(lat, lon, c.restaurant_lat[restaurants], c.restaurant_lon[restaurants])


def test_a_known_user_without_a_location_is_served_only_items_deliverable_to_home(
    state: ServingSnapshot,
) -> None:
    tables = state.tables
    for row in (0, 1, 7, 100):
        user = str(tables.user_ids[row])
        home = float(tables.user_home_lat[row]), float(tables.user_home_lon[row])
        rec = _serve(state, user, None)
        assert len(rec.items) == 20
        assert NO_LOCATION not in rec.degraded_reasons
        assert (_km(state, rec, *home) <= RADIUS_KM).all()
        # The same as naming the home as the location: the home is the delivery point.
        located = _serve(state, user, Location(*home))
        assert rec.items.sku_ids.tolist() == located.items.sku_ids.tolist()


def test_an_unknown_user_with_a_location_gets_popular_items_near_it(
    state: ServingSnapshot,
) -> None:
    c = state.tables.catalogue
    where = Location(float(c.restaurant_lat[5]), float(c.restaurant_lon[5]))
    rec = _serve(state, "never-seen-user", where)
    assert len(rec.items) > 0
    assert (_km(state, rec, where.lat, where.lon) <= RADIUS_KM).all()
    assert UNKNOWN_USER in rec.degraded_reasons
    assert NO_LOCATION not in rec.degraded_reasons


def test_only_an_unknown_user_without_a_location_gets_the_city_wide_fallback_flagged(
    state: ServingSnapshot,
) -> None:
    rec = _serve(state, "never-seen-user", None)
    assert len(rec.items) == 20
    assert NO_LOCATION in rec.degraded_reasons
    assert state.retriever.availability.item_mask[rec.items.sku_ids].all()
