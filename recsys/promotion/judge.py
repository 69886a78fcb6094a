"""Run every gate on a challenger against the production version and decide.

:func:`run_gates` is what ``recsys models gates``, ``promote`` and ``canary`` call (and the loop
controller): it scores the same held-out sessions with both versions, replays logged requests
through the challenger when an exposure log is given, and runs the serving checks with the
policy's budgets. :func:`guarded` wraps a routing change: a failing report refuses it with the
numbers unless forced, and either way the verdict is written to the registry's decision history.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recsys.control.store import Document
from recsys.promotion.gates import (
    Check,
    GateReport,
    infra_checks,
    model_megabytes,
    offline_checks,
    replay_checks,
    report,
)
from recsys.promotion.holdout import EvalSet, describe, world_holdout
from recsys.promotion.policy import Policy
from recsys.ranking.model import ModelRejected, load_model_version
from recsys.ranking.registry import ModelRegistry, RegistryError, check_latency, load_for_serving
from recsys.replay import LoggedRequest, Replayer, ReplayError, diff_against, iter_records

REPLAY_MAX_REQUESTS = 300
"""The most recent logged requests the replay gate runs through the challenger."""


@dataclass(frozen=True)
class LoggedTraffic:
    """Where the replay gate finds logged requests: the exposure log and its snapshots."""

    exposures: Path
    snapshots: Path


def champion_of(registry: ModelRegistry, name: str) -> str:
    table, _ = registry.routing()
    route = table.models.get(name)
    if route is None:
        raise RegistryError(f"{name}: no production version to compare against")
    return route.production


def run_gates(
    registry: ModelRegistry,
    name: str,
    version: str,
    policy: Policy,
    *,
    eval_set: EvalSet | None = None,
    traffic: LoggedTraffic | None = None,
    champion: str | None = None,
) -> GateReport:
    """Every gate on ``name``/``version`` against ``champion`` (default: production)."""
    champion = champion or champion_of(registry, name)
    registry.manifest(name, version)  # a missing version: RegistryError naming it
    if eval_set is None:
        world, tables, _, _ = registry.serving_inputs()
        eval_set = world_holdout(world, tables)
    checks: list[Check] = []
    checks += _offline(registry, name, version, champion, eval_set, policy)
    checks += _infra(registry, name, version, policy)
    diff = _replay_diff(registry, name, version, traffic, policy) if traffic else None
    checks += replay_checks(diff, policy.replay)
    return report(
        name,
        version,
        champion,
        policy,
        checks,
        {"held_out": describe(eval_set), "policy_hash": policy.content_hash},
    )


def _offline(
    registry: ModelRegistry,
    name: str,
    version: str,
    champion: str,
    eval_set: EvalSet,
    policy: Policy,
) -> list[Check]:
    try:
        a = load_model_version(registry.root, name, champion)
        b = load_model_version(registry.root, name, version)
    except ModelRejected as e:
        return [Check("offline", "load", None, math.nan, "loads", passed=False, note=str(e))]
    x = eval_set.features
    return offline_checks(
        eval_set,
        np.asarray(a.booster.predict(x, num_threads=1)),
        np.asarray(b.booster.predict(x, num_threads=1)),
        policy.offline.checks,
        policy.offline.min_groups,
    )


def _infra(registry: ModelRegistry, name: str, version: str, policy: Policy) -> list[Check]:
    error, per_row = "", math.nan
    try:
        model, _ = load_for_serving(
            registry.root,
            name,
            version,
            compile_models=registry.compile_models,
            latency_budget_us=math.inf,
        )
        per_row = check_latency(model, math.inf)
    except ModelRejected as e:
        error = str(e)
    megabytes = model_megabytes(
        registry.root.model_dir(name, version), registry.root.compiled_dir(name, version)
    )
    return infra_checks(error, per_row, megabytes, policy.infra)


def _replay_diff(
    registry: ModelRegistry,
    name: str,
    version: str,
    traffic: LoggedTraffic,
    policy: Policy,
) -> dict[str, dict[str, dict[str, float]]] | None:
    if not traffic.exposures.is_dir():
        return None
    replayer = Replayer(registry.root.path, traffic.snapshots)
    usable: list[LoggedRequest] = []
    for record in itertools.islice(_newest_first(traffic.exposures), REPLAY_MAX_REQUESTS * 4):
        try:
            logged = LoggedRequest.parse(record)
            replayer.snapshot(logged.snapshot_id)
        except ReplayError:
            continue  # a record of a retired snapshot or an older format: not replayable
        if logged.model_version == version:
            continue  # already served by the challenger (a canary): no diff to see
        usable.append(logged)
        if len(usable) >= REPLAY_MAX_REQUESTS:
            break
    if len(usable) < policy.replay.min_requests:
        return {"overall": {"all": {"requests": float(len(usable))}}} if usable else None
    try:
        return diff_against(replayer, usable, name, version)
    except ReplayError:
        return None


def _newest_first(directory: Path) -> list[dict[str, Any]]:
    newest: deque[dict[str, Any]] = deque(iter_records(directory), maxlen=REPLAY_MAX_REQUESTS * 4)
    newest.reverse()
    return list(newest)


def guarded(
    registry: ModelRegistry,
    gates: GateReport,
    action: str,
    change: Callable[[str], Document],
    *,
    force: bool,
    on_record: Callable[[str, dict[str, Any]], None] | None = None,
) -> Document:
    """Apply ``change(note)`` if the gates passed or ``force``; record the verdict either way.

    A refusal raises :class:`RegistryError` with the failing checks and their numbers; the
    routing is left as it was. ``on_record(version, entry)`` sees each decision record written
    (the CLI logs it to MLflow).
    """
    name = gates.name
    record = on_record or (lambda _version, _entry: None)
    if not gates.passed and not force:
        record(
            gates.version,
            registry.record_decision(
                name, {"decision": "refused", "action": action, "gates": gates.to_dict()}
            ),
        )
        failures = "\n".join(f"  {c.line()}" for c in gates.failures)
        raise RegistryError(
            f"{action}: refused: {gates.summary()}\n{failures}\n"
            "  (--force overrides; the override is recorded in the history)"
        )
    forced = not gates.passed
    note = (
        f"forced past failed gates: {', '.join(c.gate + ' ' + c.name for c in gates.failures)}"
        if forced
        else "gates passed"
    )
    document = change(note)
    entry = registry.record_decision(
        name,
        {
            "decision": "forced" if forced else "passed",
            "action": action,
            "routing_version": document.version,
            "gates": gates.to_dict(),
        },
    )
    record(gates.version, entry)
    return document
