"""The Grafana dashboard: valid JSON whose queries only name series the code exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "ops" / "grafana" / "recsys-dashboard.json"


def exported_names() -> set[str]:
    """Every recsys_ series name written in the code (prometheus_client adds _total/_bucket)."""
    names: set[str] = set()
    for path in (ROOT / "recsys").rglob("*.py"):
        names |= set(re.findall(r'"(recsys_[a-z0-9_]+)"', path.read_text()))
    suffixes = ("_total", "_bucket", "_sum", "_count")
    return names | {n + s for n in names for s in suffixes}


def test_every_query_names_a_series_the_code_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    used = {name for e in exprs for name in re.findall(r"recsys_[a-z0-9_]+", e)}
    assert used, "no recsys_ series queried"
    assert used <= exported_names(), used - exported_names()
    titles = " ".join(p["title"] for p in dashboard["panels"])
    for section in ("Drift", "Online quality", "Serving"):
        assert section in titles
