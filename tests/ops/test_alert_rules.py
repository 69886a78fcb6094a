"""The alert rules in ops/prometheus: valid for Prometheus, and they fire (and stay quiet) as
their unit tests say, run by the real promtool (CI installs it; elsewhere the test is skipped)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

RULES = Path(__file__).resolve().parents[2] / "ops" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (apt-get install prometheus; CI has it)"
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=RULES, capture_output=True, text=True, timeout=120, check=False
    )


def alert_names() -> list[str]:
    groups = yaml.safe_load((RULES / "recsys-alerts.yml").read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"]]


@needs_promtool
def test_the_alert_rules_are_valid_prometheus_rules() -> None:
    result = promtool("check", "rules", "recsys-alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in result.stdout


def test_every_alert_has_a_unit_test() -> None:
    tests = yaml.safe_load((RULES / "recsys-alerts.test.yml").read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"]}
    assert set(alert_names()) <= tested


@needs_promtool
def test_the_alert_rules_fire_as_their_unit_tests_expect() -> None:
    result = promtool("test", "rules", "recsys-alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_a_rule_unit_test_expecting_the_wrong_alert_fails(tmp_path: Path) -> None:
    """The unit tests can fail: an expectation the rules do not meet is reported."""
    broken = (
        (RULES / "recsys-alerts.test.yml")
        .read_text()
        .replace("feature: item_ctr", "feature: item_price", 1)
    )
    (tmp_path / "recsys-alerts.yml").write_text((RULES / "recsys-alerts.yml").read_text())
    (tmp_path / "broken.test.yml").write_text(broken)
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "test", "rules", "broken.test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "RecsysFeatureNaN" in result.stdout + result.stderr
