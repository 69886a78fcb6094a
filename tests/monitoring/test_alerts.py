"""The report's alert conditions match the Prometheus rules: same thresholds, same exclusions."""

from __future__ import annotations

import re
from pathlib import Path

from recsys.monitoring import alerts
from recsys.monitoring.alerts import quality_drops, window_flags
from recsys.monitoring.quality import quality_stats
from tests.monitoring.test_quality import joined

RULES = (
    Path(__file__).resolve().parents[2] / "ops" / "prometheus" / "recsys-alerts.yml"
).read_text()


def rule(name: str) -> str:
    return RULES.split(f"- alert: {name}")[1].split("- alert:")[0]


def test_the_thresholds_are_the_rules_thresholds() -> None:
    drift, nan, oor = (
        rule("RecsysFeatureDrift"),
        rule("RecsysFeatureNaN"),
        rule("RecsysFeatureOutOfRange"),
    )
    assert re.search(r"\) > 0\.2\n", drift)
    assert alerts.DRIFT_PSI == 0.2
    assert "recsys_drift_window_requests) >= 1000" in drift
    assert alerts.DRIFT_MIN_REQUESTS == 1000
    assert "> 0.01" in nan
    assert alerts.NAN_SHARE == 0.01
    assert "recsys_drift_window_requests) >= 100\n" in nan
    assert alerts.NAN_MIN_REQUESTS == 100
    assert "> 0.05" in oor
    assert alerts.OUT_OF_RANGE_SHARE == 0.05
    for body in (drift, oor):
        assert 'feature!~"' + "|".join(alerts.CLOCK_FEATURES) + '"' in body


def record(requests: int, **columns: dict[str, float | None]) -> dict[str, object]:
    return {
        "type": "drift",
        "ts": 1.0,
        "model_version": "v1",
        "arm": "all",
        "requests": requests,
        "columns": columns,
    }


def test_a_window_flags_drift_nan_and_range_but_not_the_clock_or_small_windows() -> None:
    flags = window_flags(
        record(
            5000,
            item_price={"drift_psi": 0.5, "nan_share": 0.0, "out_of_range_share": 0.2},
            item_ctr={"drift_psi": 0.01, "nan_share": 0.3, "out_of_range_share": 0.0},
            hour_sin={"drift_psi": 4.0, "nan_share": 0.0, "out_of_range_share": 0.9},
            score={"drift_psi": None, "nan_share": 0.0, "out_of_range_share": 0.0},
        )
    )
    assert {(f.alert, f.feature) for f in flags} == {
        ("RecsysFeatureDrift", "item_price"),
        ("RecsysFeatureOutOfRange", "item_price"),
        ("RecsysFeatureNaN", "item_ctr"),
    }
    assert window_flags(record(500, item_price={"drift_psi": 0.9})) == []


def test_a_quality_drop_is_two_intervals_apart_and_needs_enough_impressions() -> None:
    reference = quality_stats([joined(f"r{i}", i, [0] if i % 4 else []) for i in range(600)], 0, 1)
    worse = quality_stats([joined(f"w{i}", i, [0] if i % 8 == 0 else []) for i in range(600)], 0, 1)
    same = quality_stats([joined(f"s{i}", i, [0] if i % 4 else []) for i in range(600)], 0, 1)
    assert "ctr" in quality_drops(worse[-1], reference[-1])
    assert quality_drops(same[-1], reference[-1]) == []
    few = quality_stats([joined(f"f{i}", i, []) for i in range(100)], 0, 1)  # 500 impressions
    assert quality_drops(few[-1], reference[-1]) == []
