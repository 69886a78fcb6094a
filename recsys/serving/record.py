"""The exposure record: what one response showed one user, and everything that produced it.

Captured on the request path as references (no copying, no encoding); encoded to one JSON line
later, in the sink's writer thread::

    {"ts", "request_id", "user_id", "surface", "platform", "has_location", "model_version",
     "index_version", "config_version", "exposures": [{"layer", "experiment", "arm", "bucket",
     "forced"}], "degraded", "degraded_reason", "sku_ids": [...], "scores": [...]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from recsys.types import Recommendation, Request


@dataclass(frozen=True, slots=True)
class ExposureRecord:
    """One response, captured on the request path; encoded later, in the writer thread."""

    ts: float
    request: Request
    recommendation: Recommendation

    def to_json(self) -> str:
        rec = self.recommendation
        line: dict[str, Any] = {
            "ts": round(self.ts, 6),
            "request_id": rec.request_id,
            "user_id": self.request.user_id,
            "surface": self.request.surface,
            "platform": self.request.platform,
            "has_location": self.request.location is not None,
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
            "degraded_reason": rec.degraded_reason,
            "sku_ids": rec.items.sku_ids.tolist(),
            "scores": np.round(rec.items.scores.astype(np.float64), 6).tolist(),
        }
        return json.dumps(line, separators=(",", ":")) + "\n"
