"""The alert conditions of ``ops/prometheus/recsys-alerts.yml``, evaluated on window summaries.

Prometheus evaluates the rules on the live series; the report and the detection benchmark
evaluate the same conditions, with the same thresholds, on the persisted window summaries (a
summary is one window, so the rules' ``for:`` duration is not applied here: a flagged window is
what would turn the alert pending). Keep the two in step: tests/monitoring/test_alerts.py reads
the thresholds out of the rules file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from recsys.monitoring.quality import QualityStats

DRIFT_PSI = 0.2
"""Industry convention: PSI above 0.2 is a significant shift."""
DRIFT_MIN_REQUESTS = 1000
NAN_SHARE = 0.01
NAN_MIN_REQUESTS = 100
OUT_OF_RANGE_SHARE = 0.05
CLOCK_FEATURES = ("hour_sin", "hour_cos")
"""Context features that follow the clock by design: not judged for drift or range."""


@dataclass(frozen=True)
class Flag:
    """One alert condition met by one window."""

    alert: str
    model_version: str
    arm: str
    feature: str
    value: float
    ts: float


def _value(column: Mapping[str, Any], key: str) -> float | None:
    value = column.get(key)
    return None if value is None else float(value)


def window_flags(record: Mapping[str, Any]) -> list[Flag]:
    """The alert conditions a drift summary record meets."""
    requests = int(record.get("requests", 0))
    version, arm, ts = str(record["model_version"]), str(record["arm"]), float(record["ts"])
    flags = []
    for feature, column in record.get("columns", {}).items():
        judged = feature not in CLOCK_FEATURES
        checks = (
            ("RecsysFeatureDrift", "drift_psi", DRIFT_PSI, DRIFT_MIN_REQUESTS, judged),
            ("RecsysFeatureNaN", "nan_share", NAN_SHARE, NAN_MIN_REQUESTS, True),
            (
                "RecsysFeatureOutOfRange",
                "out_of_range_share",
                OUT_OF_RANGE_SHARE,
                DRIFT_MIN_REQUESTS,
                judged,
            ),
        )
        for alert, key, threshold, min_requests, applies in checks:
            value = _value(column, key)
            if applies and requests >= min_requests and value is not None and value > threshold:
                flags.append(Flag(alert, version, arm, feature, value, ts))
    return flags


def all_flags(records: Iterable[Mapping[str, Any]]) -> list[Flag]:
    return [f for r in records if r.get("type") == "drift" for f in window_flags(r)]


QUALITY_MIN_IMPRESSIONS = 2000
"""Impressions a quality window needs on both sides before a drop is judged."""


def quality_drops(current: QualityStats, reference: QualityStats) -> list[str]:
    """The metrics (ctr, order_rate, ndcg) whose 95 % interval in ``current`` lies wholly below
    the ``reference`` window's: the two intervals separate, a drop no noise explains."""
    if min(current.impressions, reference.impressions) < QUALITY_MIN_IMPRESSIONS:
        return []
    out = []
    for metric, low, high in (
        ("ctr", "ctr_low", "ctr_high"),
        ("order_rate", "order_low", "order_high"),
        ("ndcg", "ndcg_low", "ndcg_high"),
    ):
        if getattr(current, high) < getattr(reference, low):
            out.append(metric)
    return out
