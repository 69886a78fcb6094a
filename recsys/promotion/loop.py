"""The retraining loop's steps, shared by ``recsys loop`` (one process, a demo) and
``recsys controller`` (a fleet's Deployment).

:class:`LoopController` makes one *look* at a time (:meth:`LoopController.look`), blocking (file
reads, joins, training: run it off any event loop):

- every model with an active canary is judged by :class:`CanaryController` (sequential test,
  guardrails) and ramped, promoted or rolled back through the routing document. A canary this
  controller did not start, or started before a restart, is picked up from the routing history
  (:func:`resume`): the evidence counts from when the routing made it a canary, so a restarted
  controller resumes the analysis rather than starting it over;
- with ``retrain`` on, production's click-through rate is watched (the first
  ``window_requests`` complete requests since the watch began against the latest as many; 99 %
  Wilson intervals apart is drift); once ``retrain_requests`` more requests are logged a
  challenger is retrained on the logged traffic since the drifted window, gated against
  production on the held-out logged requests and put on the first canary step (or refused).

Each step is told to ``say(text, mark)`` (the loop's timeline, the controller's log) and every
decision goes into the registry's decision history and, with a tracker, MLflow.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from recsys.control.store import HISTORY_LIMIT, ROUTING, Document, StoreError
from recsys.pipeline.archive import snapshot_directory
from recsys.promotion.canary import CanaryDecision, CanaryState, arm_stats, start
from recsys.promotion.controller import CanaryController, LogSources, joined_since, wilson_separated
from recsys.promotion.gates import GateReport
from recsys.promotion.judge import LoggedTraffic, guarded, run_gates
from recsys.promotion.policy import Policy
from recsys.promotion.retrain import RetrainError, retrain
from recsys.promotion.tracking import Tracker, TrackingError
from recsys.ranking.registry import ModelRegistry, RegistryError

Say = Callable[[str, str], None]
"""``say(text, mark)``: a step happened; ``mark`` names it for the timeline ('' for none)."""


@dataclass(frozen=True)
class LoopSettings:
    name: str = "ranker"
    """The model whose production is watched and retrained."""
    retrain: bool = True
    """Watch production for drift and retrain; off: only judge canaries."""
    window_requests: int = 1500
    """Production requests in the monitor's reference and current windows."""
    retrain_requests: int = 6000
    """Logged requests after the drifted window began before retraining."""
    shuffle_labels: bool = False
    """Retrain on shuffled labels from scratch, no warm start (the sabotage demo)."""
    force_canary: bool = False
    """Put a challenger the gates refused on the canary anyway, recorded as forced."""
    min_scores: int = 2000
    """Served scores per half before the score-stability guardrail judges."""


@dataclass(frozen=True)
class Outcome:
    """What a look ended, for a caller that stops there (``recsys loop``)."""

    action: str
    """promote | rollback | refused | retrain-failed"""
    text: str


class LoopController:
    def __init__(
        self,
        registry: ModelRegistry,
        policy: Policy,
        sources: LogSources,
        settings: LoopSettings,
        *,
        say: Say = lambda _text, _mark: None,
        tracker: Tracker | None = None,
        stopping: Callable[[], bool] = lambda: False,
        on_decision: Callable[[str], None] = lambda _action: None,
        clock: Callable[[], float] = time.time,
        since: float | None = None,
    ) -> None:
        self.registry = registry
        self.policy = policy
        self.sources = sources
        self.settings = settings
        self.say = say
        self.tracker = tracker
        self.stopping = stopping
        """Checked before each routing change: True abandons the look before it writes."""
        self.on_decision = on_decision
        """Told each decision's action (continue, ramp, promote, rollback, canary, refused)."""
        self.clock = clock
        self.canaries = CanaryController(
            registry, policy.canary, sources, on_record=self.record, clock=clock,
            min_scores=settings.min_scores,
        )  # fmt: skip
        self.judging: dict[str, CanaryState] = {}
        """Canaries being judged, by model name."""
        self._last_action: dict[str, str] = {}
        self._watch_since = clock() if since is None else since
        self._watched = ""
        self._drift_start: float | None = None

    def record(self, version: str, entry: dict[str, Any]) -> None:
        """A decision record written to the registry, to MLflow too."""
        if self.tracker is not None:
            with contextlib.suppress(TrackingError):
                self.tracker.log_decision(self.registry.root, self._name_of(entry), version, entry)

    def _name_of(self, entry: dict[str, Any]) -> str:
        """The model a decision record is about (canary records carry their state, gate
        records their report)."""
        for part in ("state", "gates"):
            value = entry.get(part)
            if isinstance(value, dict) and value.get("name"):
                return str(value["name"])
        return self.settings.name

    def look(self) -> list[Outcome]:
        """One look at every canary and (``retrain``) at production; what it decided."""
        table, _ = self.registry.routing()
        outcomes: list[Outcome] = []
        for name, route in table.models.items():
            if route.canary and route.canary_percent > 0:
                if self.stopping():
                    break
                outcome = self._judge(name, route.canary, route.canary_percent, route.production)
                if outcome is not None:
                    outcomes.append(outcome)
            else:
                self.judging.pop(name, None)
                if self.settings.retrain and name == self.settings.name:
                    outcome = self._watch(name, route.production)
                    if outcome is not None:
                        outcomes.append(outcome)
        return outcomes

    # -- canaries --------------------------------------------------------------------------------

    def _judge(self, name: str, version: str, percent: float, champion: str) -> Outcome | None:
        state = self.judging.get(name)
        if state is None or (state.version, state.percent) != (version, percent):
            state = resume(self.registry, self.sources, name, version, champion, self.clock())
            self.say(
                f"judging canary {name}/{version} at {percent:g}% (canary since "
                f"{time.strftime('%H:%M:%S', time.localtime(state.started_at))})",
                "",
            )
            self._last_action[name] = ""
        state, decision = self.canaries.look(state)
        self.on_decision(decision.action)
        self._said(name, decision)
        if state.done:
            self.judging.pop(name, None)
            self._watch_again()
            if decision.action == "promote":
                return Outcome("promote", f"promoted {name}/{version}")
            return Outcome(
                "rollback", f"rolled back {name}/{version}; production {champion} untouched"
            )
        self.judging[name] = state
        return None

    def _said(self, name: str, decision: CanaryDecision) -> None:
        """Every decision but a ``continue`` after a ``continue`` (the timeline's rhythm)."""
        if decision.action != "continue" or self._last_action.get(name) != "continue":
            self.say(f"canary: {decision.line()}", decision.action)
        self._last_action[name] = decision.action

    # -- drift, retraining, gates ----------------------------------------------------------------

    def _watch_again(self) -> None:
        """A new reference window from now (after a routing decision or a refusal)."""
        self._watch_since = self.clock()
        self._drift_start = None

    def _watch(self, name: str, champion: str) -> Outcome | None:
        if champion != self._watched:
            if self._watched:
                self._watch_again()
            self._watched = champion
        if self._drift_start is None:
            flagged, window_start, numbers = drift(
                self.sources, self._watch_since, champion, self.settings.window_requests,
                self.clock(),
            )  # fmt: skip
            if not flagged:
                return None
            self._drift_start = window_start
            self.say(f"monitor: drift flagged on {name}/{champion}: {numbers}", "drift")
        logged = count_since(self.sources, self._drift_start, self.clock())
        if logged < self.settings.retrain_requests or self.stopping():
            return None
        outcome = self._retrain_and_gate(name, champion, self._drift_start, logged)
        if outcome is not None:
            self._watch_again()
        return outcome

    def _retrain_and_gate(
        self, name: str, champion: str, since: float, logged: int
    ) -> Outcome | None:
        """Retrain, gate, start the canary (None: on the canary, judged from the next look)."""
        sources = self.sources
        self.say(f"retraining on {logged:,} requests logged since the drifted window", "")
        try:
            result = retrain(
                self.registry,
                name,
                exposures=sources.exposures,
                outcomes=sources.outcomes,
                since=since,
                until=self.clock() - sources.late_seconds,
                late_seconds=sources.late_seconds,
                shuffle_labels=self.settings.shuffle_labels,
                # Sabotage is a model that learned nothing: warm-started, it would keep
                # production's trees under the noise (such a one was not worse on live orders).
                warm_start=not self.settings.shuffle_labels,
            )
        except RetrainError as e:
            self.say(f"retrain failed: {e}", "")
            return Outcome("retrain-failed", "retrain failed")
        version = result.version
        if self.tracker is not None:
            with contextlib.suppress(TrackingError):
                self.tracker.log_version(
                    self.registry.root, name, version, "retrain", lineage=result.lineage
                )
        self.say(
            f"registered challenger {name}/{version} (ndcg@20 on held-out logged requests "
            f"{result.metrics.get('ndcg@20.ranker', math.nan):.4f}, "
            f"shuffled labels: {self.settings.shuffle_labels})",
            "retrained",
        )
        report = run_gates(
            self.registry,
            name,
            version,
            self.policy,
            eval_set=result.data.eval_set(),
            traffic=LoggedTraffic(sources.exposures, snapshot_directory(sources.exposures)),
        )
        for line in report.lines()[:2] + [f"  {c.line()}" for c in report.failures][:6]:
            self.say(line, "")
        if self.stopping():  # the version stays registered, off the routing: nothing half-done
            self.say(f"stopping: {name}/{version} left registered, not canaried", "")
            return None
        first = self.policy.canary.ramp[0]
        force = self.settings.force_canary
        if start_canary(self.registry, report, first, force=force, on_record=self.record) is None:
            self.on_decision("refused")
            self.say("gates refused the challenger; production untouched", "refused")
            return Outcome("refused", f"refused by the gates; production {champion} untouched")
        if not report.passed:
            self.say("gates refused the challenger; forced onto the canary (--force-canary)", "")
        self.on_decision("canary")
        self.say(f"canary {name}/{version} at {first:g}% of users", "canary")
        self.judging[name] = self.canaries.begin(name, version, first)
        self._last_action[name] = ""
        return None


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


def resume(
    registry: ModelRegistry,
    sources: LogSources,
    name: str,
    version: str,
    champion: str,
    now: float,
) -> CanaryState:
    """The analysis state of ``name``'s canary ``version`` as the routing history tells it.

    The canary started when the routing last made ``version`` the canary (the oldest of the
    newest run of versions naming it), its current step when its percentage was last set; the
    canary requests before the step count as the step's start. A history without bodies (or a
    canary older than it) starts both now.
    """
    table, _ = registry.routing()
    percent = table.models[name].canary_percent
    started = step = now
    try:
        history = registry.store.history(ROUTING, limit=HISTORY_LIMIT)
    except StoreError:
        history = []
    in_step = True
    for entry in history:  # newest first
        route = (entry.body or {}).get("models", {}).get(name, {})
        canary = route.get("canary") or {}
        if canary.get("version") != version or not canary.get("percent"):
            break
        started = entry.updated_at
        in_step = in_step and float(canary["percent"]) == percent
        if in_step:
            step = entry.updated_at
    state = start(name, version, champion, percent, started)
    if step <= started:
        return state
    before_step = (r for r in joined_since(sources, started, now) if r.ts < step)
    _, canary_arm, _ = arm_stats(before_step, state, "click_rate")
    return replace(state, step_started_at=step, step_start_requests=canary_arm.requests)


def drift(
    sources: LogSources, since: float, champion: str, window: int, now: float
) -> tuple[bool, float, str]:
    """Production's click-through rate (clicks per impression): the first ``window`` complete
    requests since ``since`` against the latest ``window`` (drift when the latest's 99 %
    interval lies below the first's). Returns (flagged, the latest window's start, numbers)."""
    rows: list[tuple[float, int, int]] = []
    for request in joined_since(sources, since, now):
        if request.complete and request.model_version == champion:
            clicked = request.clicked | request.ordered
            rows.append((request.ts, int(clicked.sum()), int(request.impressed.sum())))
    if len(rows) < 2 * window:
        return False, 0.0, f"{len(rows)} requests"
    reference, current = rows[:window], rows[-window:]
    ref = (sum(r[1] for r in reference), sum(r[2] for r in reference))
    cur = (sum(r[1] for r in current), sum(r[2] for r in current))
    numbers = (
        f"CTR {ref[0] / max(ref[1], 1):.4f} in the first {window} requests, "
        f"{cur[0] / max(cur[1], 1):.4f} in the latest {window} (99% Wilson intervals apart)"
    )
    return wilson_separated(ref, cur), current[0][0], numbers


def count_since(sources: LogSources, since: float, now: float) -> int:
    return sum(1 for _ in joined_since(sources, since, now))
