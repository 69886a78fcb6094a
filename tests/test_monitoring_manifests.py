"""deploy/monitoring.yaml: the alert rules and the Grafana dashboard of ops/, as a cluster takes
them (a PrometheusRule for the Prometheus Operator, a ConfigMap for Grafana's dashboard sidecar).

The manifests are generated from ops/prometheus/recsys-alerts.yml and
ops/grafana/recsys-dashboard.json, never edited by hand: `make deploy-monitoring` (this module's
``main``) writes them, and the test below fails when they no longer match their sources.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "ops" / "prometheus" / "recsys-alerts.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "recsys-dashboard.json"
MANIFEST = ROOT / "deploy" / "monitoring.yaml"
HEADER = """\
# Generated from ops/prometheus/recsys-alerts.yml and ops/grafana/recsys-dashboard.json by
# `make deploy-monitoring`; do not edit (tests/test_monitoring_manifests.py checks it matches).
# The PrometheusRule needs the Prometheus Operator (its `release` label selects the rules); the
# ConfigMap is picked up by Grafana's dashboard sidecar (label grafana_dashboard).
"""
LABELS = {"app.kubernetes.io/name": "recsys", "app.kubernetes.io/component": "monitoring"}


class _Dumper(yaml.SafeDumper):  # type: ignore[misc]  # yaml has no type information here
    """Multi-line strings (PromQL, the dashboard JSON) as literal blocks, readable in review."""


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def render() -> str:
    rules: dict[str, Any] = yaml.safe_load(RULES.read_text())
    dashboard = DASHBOARD.read_text()
    json.loads(dashboard)  # a dashboard that does not parse must not reach a cluster
    documents = [
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PrometheusRule",
            "metadata": {
                "name": "recsys",
                "namespace": "recsys",
                "labels": {**LABELS, "release": "prometheus"},
            },
            "spec": {"groups": rules["groups"]},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "recsys-grafana-dashboard",
                "namespace": "recsys",
                "labels": {**LABELS, "grafana_dashboard": "1"},
            },
            "data": {DASHBOARD.name: dashboard if dashboard.endswith("\n") else dashboard + "\n"},
        },
    ]
    body: str = yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False, width=100)
    return HEADER + body


def test_the_deployed_rules_and_dashboard_are_those_of_ops() -> None:
    stale = "deploy/monitoring.yaml differs from ops/: run make deploy-monitoring"
    assert MANIFEST.read_text() == render(), stale
    rule, dashboard = yaml.safe_load_all(MANIFEST.read_text())
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    assert json.loads(dashboard["data"][DASHBOARD.name]) == json.loads(DASHBOARD.read_text())


def main() -> None:
    MANIFEST.write_text(render())
    print(f"wrote {MANIFEST.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
