"""The canary controller: looks at live traffic, decides, moves the routing, writes it down.

:class:`CanaryController` runs the analysis of promotion/canary.py against what the servers
logged: the exposure records since the canary started joined with their outcome events, the
canary's served scores (later half against earlier half), and (with a metrics URL) the server's
error rate and p99 between two looks. A ramp, promotion or rollback is applied through the
registry (the routing document every server follows, by user hash) and every decision other
than ``continue`` is appended to the registry's decision history and passed to ``on_record``
(MLflow). Blocking (file reads, a LightGBM-free join, one HTTP scrape): run it off any event
loop.
"""

from __future__ import annotations

import math
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsys.linelog.reading import iter_log_lines
from recsys.outcomes.join import JoinedRequest, join_outcomes
from recsys.outcomes.reader import iter_outcomes
from recsys.promotion.canary import (
    CanaryDecision,
    CanaryState,
    Guardrails,
    ServerCounters,
    arm_stats,
    decide,
    decision_record,
    guardrails_between,
    parse_metrics,
    score_psi,
    start,
)
from recsys.promotion.policy import CanaryPolicy
from recsys.ranking.registry import ModelRegistry


@dataclass(frozen=True)
class LogSources:
    exposures: Path
    outcomes: Path
    late_seconds: float
    metrics_url: str = ""
    """``http://127.0.0.1:PORT/metrics`` of the server (loopback), for the guardrails."""


def scrape(url: str, timeout: float = 2.0) -> ServerCounters | None:
    if not url:
        return None
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return parse_metrics(response.read().decode())
    except OSError:
        return None


def joined_since(sources: LogSources, since: float, now: float) -> Iterator[JoinedRequest]:
    records = (
        record
        for _path, _number, record in iter_log_lines(sources.exposures, modified_since=since)
        if isinstance(record.get("ts"), int | float) and record["ts"] >= since
    )
    events = iter_outcomes(sources.outcomes, since) if sources.outcomes.is_dir() else iter(())
    return join_outcomes(records, events, late_seconds=sources.late_seconds, now=now)


class CanaryController:
    def __init__(
        self,
        registry: ModelRegistry,
        policy: CanaryPolicy,
        sources: LogSources,
        *,
        on_record: Callable[[str, dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.time,
        min_scores: int = 2000,
    ) -> None:
        self.registry = registry
        self.policy = policy
        self.sources = sources
        self.on_record = on_record or (lambda _version, _entry: None)
        self.clock = clock
        self.min_scores = min_scores
        """Served scores per half before the score-stability guardrail judges."""
        self._counters: ServerCounters | None = None

    def begin(self, name: str, version: str, percent: float) -> CanaryState:
        """State of a canary already routed at ``percent`` (the gates ran before)."""
        table, _ = self.registry.routing()
        champion = table.models[name].production
        self._counters = scrape(self.sources.metrics_url)
        return start(name, version, champion, percent, self.clock())

    def look(self, state: CanaryState) -> tuple[CanaryState, CanaryDecision]:
        now = self.clock()
        champion, canary, scores = arm_stats(
            joined_since(self.sources, state.started_at, now), state, self.policy.metric
        )
        psi_value = score_psi(scores, self.min_scores)
        counters = scrape(self.sources.metrics_url)
        guardrails = (
            guardrails_between(self._counters, counters, psi_value)
            if counters is not None and self._counters is not None
            else Guardrails(score_psi=psi_value)
        )
        if counters is not None:
            self._counters = counters
        state, decision = decide(self.policy, state, champion, canary, guardrails, now)
        if decision.action != "continue":
            self._apply(state, decision)
        return state, decision

    def _apply(self, state: CanaryState, decision: CanaryDecision) -> None:
        name, version = state.name, state.version
        note = f"canary analysis: {decision.reason}"
        if decision.action == "ramp":
            document = self.registry.canary(name, version, decision.percent, note=note)
        elif decision.action == "promote":
            document = self.registry.promote(name, version, note=note)
        else:  # rollback: the canary's users go back to production, which never changed
            document = self.registry.canary(name, version, 0, note=note)
        record = decision_record(state, decision)
        record["routing_version"] = document.version
        self.on_record(version, self.registry.record_decision(name, record))

    def run(
        self,
        state: CanaryState,
        *,
        look_seconds: float,
        max_seconds: float,
        say: Callable[[CanaryDecision], None] = lambda _d: None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> tuple[CanaryState, CanaryDecision]:
        """Look every ``look_seconds`` until a promotion or rollback, or ``max_seconds``
        (then the canary stays as it is and the last decision is ``continue``)."""
        deadline = self.clock() + max_seconds
        decision = CanaryDecision("continue", state.percent, "no look yet")
        while not state.done and self.clock() < deadline:
            sleep(look_seconds)
            state, decision = self.look(state)
            say(decision)
        return state, decision


def wilson_separated(
    reference: tuple[int, int], current: tuple[int, int], z: float = 2.576
) -> bool:
    """True when the current rate's interval lies wholly below the reference's (99%)."""
    from recsys.monitoring.statistics import wilson_interval

    if reference[1] == 0 or current[1] == 0:
        return False
    ref_low, _ = wilson_interval(reference[0], reference[1], z)
    _, cur_high = wilson_interval(current[0], current[1], z)
    return bool(cur_high < ref_low) and not math.isnan(ref_low)
