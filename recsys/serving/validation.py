"""Turn a RecommendRequest protobuf into a validated :class:`recsys.types.Request`.

Every check names the field and what was expected; the servicer maps :class:`InvalidRequest`
to INVALID_ARGUMENT with that message. Defaults are filled here: ``num_results`` 0 means 20,
an empty ``surface`` means "home", an empty ``request_id`` gets a fresh uuid4 hex.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable

import numpy as np

from recsys.types import (
    DEFAULT_NUM_RESULTS,
    DEFAULT_SURFACE,
    MAX_NUM_RESULTS,
    MAX_USER_ID_BYTES,
    Location,
    Request,
)
from recsys.v1 import recommender_pb2

MAX_EXCLUDE_SKU_IDS = 1_000
MAX_REQUEST_ID_BYTES = 128
MAX_LABEL_BYTES = 64
"""Bound for ``surface`` and ``platform``: short names that end up in logs and targeting rules."""


class InvalidRequest(ValueError):
    """A request field is out of its documented range."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def new_request_id() -> str:
    return uuid.uuid4().hex


def _check_text(field: str, value: str, *, max_bytes: int, required: bool) -> None:
    if len(value) * 4 <= max_bytes and (value or not required):
        return  # short enough whatever its characters (UTF-8: at most 4 bytes each)
    size = len(value.encode("utf-8"))
    if required and size == 0:
        raise InvalidRequest(field, f"must not be empty (expected 1..{max_bytes} bytes)")
    if size > max_bytes:
        raise InvalidRequest(field, f"is {size} bytes long; expected at most {max_bytes} bytes")


def _check_coordinate(field: str, value: float, bound: float) -> None:
    if not math.isfinite(value) or not -bound <= value <= bound:
        raise InvalidRequest(
            field, f"is {value!r}; expected a finite number in [-{bound}, {bound}]"
        )


def _validated_exclusions(ids: list[int]) -> tuple[int, ...]:
    if not ids:  # the common case, without numpy's per-call cost
        return ()
    if len(ids) > MAX_EXCLUDE_SKU_IDS:
        raise InvalidRequest(
            "exclude_sku_ids",
            f"has {len(ids)} ids; expected at most {MAX_EXCLUDE_SKU_IDS}",
        )
    array = np.asarray(ids, dtype=np.int64)
    negative = np.flatnonzero(array < 0)
    if negative.size:
        first = int(negative[0])
        raise InvalidRequest(
            f"exclude_sku_ids[{first}]",
            f"is {int(array[first])}; expected a SKU id >= 0",
        )
    return tuple(ids)


def validate_request(
    message: recommender_pb2.RecommendRequest,
    *,
    hour: int = 12,
    make_request_id: Callable[[], str] = new_request_id,
) -> Request:
    """Check ``message`` and fill its defaults; raises :class:`InvalidRequest`.

    ``hour`` is the local hour of day the feed is shown at (the servicer reads the clock); a
    request that sets its own ``hour`` (a client in another time zone, the traffic simulator)
    is ranked for that hour.
    """
    # Each field read from the message makes a new Python object: read each once.
    user_id, request_id = message.user_id, message.request_id
    surface, platform, num_results = message.surface, message.platform, message.num_results
    _check_text("user_id", user_id, max_bytes=MAX_USER_ID_BYTES, required=True)
    _check_text("request_id", request_id, max_bytes=MAX_REQUEST_ID_BYTES, required=False)
    _check_text("surface", surface, max_bytes=MAX_LABEL_BYTES, required=False)
    _check_text("platform", platform, max_bytes=MAX_LABEL_BYTES, required=False)
    if not 0 <= num_results <= MAX_NUM_RESULTS:
        raise InvalidRequest(
            "num_results",
            f"is {num_results}; expected 0..{MAX_NUM_RESULTS} "
            f"(0 means the default, {DEFAULT_NUM_RESULTS})",
        )
    if message.HasField("hour"):
        hour = message.hour
    if not 0 <= hour <= 23:
        raise InvalidRequest("hour", f"is {hour}; expected 0..23")

    location = None
    if message.HasField("location"):
        point = message.location
        lat, lon = point.lat, point.lon
        _check_coordinate("location.lat", lat, 90.0)
        _check_coordinate("location.lon", lon, 180.0)
        location = Location(lat=lat, lon=lon)

    exclusions = message.exclude_sku_ids
    return Request(
        request_id=request_id or make_request_id(),
        user_id=user_id,
        num_results=num_results or DEFAULT_NUM_RESULTS,
        location=location,
        surface=surface or DEFAULT_SURFACE,
        platform=platform,
        exclude_sku_ids=_validated_exclusions(list(exclusions)) if exclusions else (),
        hour=hour,
    )
