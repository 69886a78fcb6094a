"""The retraining loop's steps, shared by ``recsys loop`` (one process, a demo) and
``recsys controller`` (a fleet's Deployment).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from recsys.control.store import Document
from recsys.promotion.gates import GateReport
from recsys.promotion.judge import guarded
from recsys.ranking.registry import ModelRegistry, RegistryError


def start_canary(
    registry: ModelRegistry,
    report: GateReport,
    percent: float,
    *,
    force: bool = False,
    on_record: Callable[[str, dict[str, Any]], None] | None = None,
) -> Document | None:
    """Put the gated challenger on a canary at ``percent``; None when the gates refused it.

    Either way the verdict goes into the decision history; ``force`` puts a refused challenger
    on the canary anyway, recorded as ``forced`` exactly as ``recsys models canary --force``
    records it (then the canary analysis must catch it).
    """
    name, version = report.name, report.version
    try:
        return guarded(
            registry,
            report,
            f"canary {name}/{version} {percent:g}%",
            lambda note: registry.canary(name, version, percent, note=note),
            force=force,
            on_record=on_record,
        )
    except RegistryError:
        if report.passed:
            raise  # not a refusal: the routing change itself failed
        return None
