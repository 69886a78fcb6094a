"""The exposure record: what one response showed one user, and everything that produced it.

Captured on the request path as references (no copying, no encoding); encoded to one JSON line
later, in the sink's writer thread. Fields (``RECORD_VERSION`` 3; 2 had no ``cached`` and
``answer_of``)::

    record, ts, request_id, snapshot_id            which serving snapshot answered (its manifest
                                                   names every version: see pipeline/archive.py)
    user_id, surface, platform, has_location,
    location [lat, lon] | null, num_results, exclude_sku_ids, hour      the request as validated
    cached                                        answered from the result cache
    answer_of {request_id, location} | null       the request the answer was computed for (a
                                                   hit's: the earlier one in its cache cell, whose
                                                   location a replay uses)
    model_version, index_version, config_version  as in the response
    exposures [{layer, experiment, arm, bucket, forced}]
    degraded, degraded_reasons [...], degraded_reason
    sku_ids, restaurant_ids, scores               the served items, best first (rank = position)
    user_features [...] | null                    the user's feature row as the ranker used it
    candidates {sku_ids, restaurant_ids, scores} | null   every ranked candidate (sampled share)

Scores are written as the shortest decimal that reads back as the same float32, features as the
shortest that reads back as the same float64, so a replay can check them for equality. Encoded
with orjson (numpy arrays natively): ``python -m benchmarks.bench_exposure`` measured 13-16 µs a
record against 31-32 µs for the first wave's smaller record through json and tolist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from recsys.types import Recommendation, Request

RECORD_VERSION = 3


@dataclass(frozen=True, slots=True)
class ExposureRecord:
    """One response, captured on the request path; encoded later, in the writer thread."""

    ts: float
    request: Request
    recommendation: Recommendation

    def to_json(self) -> str:
        """One JSON line. Its fields from ``model_version`` on are the answer's alone, the same
        for every cache hit on it: encoded once and kept in the answer's
        :class:`~recsys.types.Encodings`, so a hit's line costs the small request part only."""
        rec = self.recommendation
        request = self.request
        location = request.location
        head = orjson.dumps(
            {
                "record": RECORD_VERSION,
                "ts": round(self.ts, 6),
                "request_id": rec.request_id,
                "snapshot_id": rec.snapshot_id,
                "user_id": request.user_id,
                "surface": request.surface,
                "platform": request.platform,
                "has_location": location is not None,
                "location": None if location is None else [location.lat, location.lon],
                "num_results": request.num_results,
                "exclude_sku_ids": list(request.exclude_sku_ids),
                "hour": request.hour,
                "cached": rec.cached,
            }
        )
        encodings = rec.encodings
        tail = None if encodings is None else encodings.record
        if tail is None:
            tail = answer_fields(rec)
            if encodings is not None:
                encodings.record = tail
        # '{head...}' and '{tail...}\n' -> '{head...,tail...}\n'
        return b"".join((head[:-1], b",", tail[1:])).decode()


def answer_fields(rec: Recommendation) -> bytes:
    """The record's fields that depend on the answer only, as a JSON object and a newline."""
    items = rec.items
    origin = rec.computed_for
    fields: dict[str, Any] = {
        "answer_of": None
        if origin is None
        else {
            "request_id": origin.request_id,
            "location": None
            if origin.location is None
            else [origin.location.lat, origin.location.lon],
        },
        "model_version": rec.model_version,
        "index_version": rec.index_version,
        "config_version": rec.config_version,
        "exposures": [
            {
                "layer": e.layer,
                "experiment": e.experiment,
                "arm": e.arm,
                "bucket": e.bucket,
                "forced": e.forced,
            }
            for e in rec.exposures
        ],
        "degraded": rec.degraded,
        "degraded_reasons": list(rec.degraded_reasons),
        "degraded_reason": rec.degraded_reason,
        "sku_ids": _array(items.sku_ids),
        "restaurant_ids": _array(items.restaurant_ids),
        "scores": _array(items.scores),
        "user_features": None if rec.user_features is None else _array(rec.user_features),
        "candidates": None
        if rec.candidates is None
        else {
            "sku_ids": _array(rec.candidates.sku_ids),
            "restaurant_ids": _array(rec.candidates.restaurant_ids),
            "scores": _array(rec.candidates.scores),
        },
    }
    return orjson.dumps(fields, option=_OPTIONS)


_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE


def _array(values: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """orjson writes C-contiguous numpy arrays directly (float32 as its shortest round-trip
    decimal, float64 likewise); a view that is not contiguous is copied first."""
    return values if values.flags.c_contiguous else np.ascontiguousarray(values)
