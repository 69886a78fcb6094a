"""Automated canary analysis: compare canary and champion traffic, decide, write it down.

At each look :func:`decide` reads the two arms' cumulative counts since the canary started (from
joined outcomes: a request is a success when it got a click, or an order, per the policy's
metric) and the guardrails, and returns the next :class:`CanaryState` and a
:class:`CanaryDecision`:

- **rollback** at once when a guardrail is breached (server error rate, p99 latency, the
  PSI of the canary's served scores, later half against earlier half) or the sequential test finds
  the canary worse (``p_harm <= alpha``);
- **ramp** to the next share of users (5 -> 25 -> 50 by default) once this step has seen
  ``min_requests_per_step`` canary requests without harm;
- **promote** (the step to 100%) only when the test has shown the canary is not worse than the
  champion by the margin (``p_noninferior <= alpha``);
- **continue** otherwise.

The test is :class:`~recsys.promotion.sequential.MixtureSPRT`, valid under any number of looks;
``benchmarks/bench_canary.py`` measures its false-rollback and false-promotion rates. Its
variance is the user-level one (:func:`~recsys.promotion.sequential.clustered_variance` over
each arm's users, at least the binomial): users are assigned to the canary, not requests, and
one user's requests succeed or fail together, so counting them as independent made the test
too sure of itself and rolled back equal models far more often than alpha. The state
is an explicit frozen value passed in and out, so a controller can persist it between looks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from recsys.monitoring.statistics import psi
from recsys.outcomes.join import JoinedRequest
from recsys.promotion.policy import CanaryPolicy
from recsys.promotion.sequential import MixtureSPRT, clustered_variance
from recsys.ranking.evaluation import bin_counts

ACTIONS = ("continue", "ramp", "promote", "rollback")


@dataclass(frozen=True)
class ArmStats:
    """One arm's requests since the canary started and how many succeeded (click or order)."""

    requests: int = 0
    successes: int = 0
    users: int = 0
    """Distinct users among the requests (0: not counted)."""
    variance: float = float("nan")
    """The variance of the arm's rate at the user level (``clustered_variance``: a user's
    requests are not independent of each other); NaN: not known, the test uses the binomial."""


@dataclass(frozen=True)
class Guardrails:
    """What the guardrails read at a look (NaN: not measured, not judged)."""

    error_rate: float = math.nan
    p99_ms: float = math.nan
    score_psi: float = math.nan


@dataclass(frozen=True)
class CanaryState:
    name: str
    version: str
    champion: str
    percent: float
    started_at: float
    step_started_at: float
    step_start_requests: int = 0
    looks: int = 0
    p_harm: float = 1.0
    p_noninferior: float = 1.0
    done: bool = False


@dataclass(frozen=True)
class CanaryDecision:
    action: str
    percent: float
    """The canary's share of users after the decision (0 after a rollback, 100 promoted)."""
    reason: str
    evidence: Mapping[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        e = self.evidence
        return (
            f"{self.action:8s} -> {self.percent:g}%  champion {e.get('champion_rate', 0):.4f} "
            f"(n {e.get('champion_requests', 0)})  canary {e.get('canary_rate', 0):.4f} "
            f"(n {e.get('canary_requests', 0)})  p_harm {e.get('p_harm', 1):.3g}  "
            f"p_noninferior {e.get('p_noninferior', 1):.3g}  {self.reason}"
        )


def start(name: str, version: str, champion: str, percent: float, now: float) -> CanaryState:
    return CanaryState(name, version, champion, percent, now, now)


def decide(
    policy: CanaryPolicy,
    state: CanaryState,
    champion: ArmStats,
    canary: ArmStats,
    guardrails: Guardrails,
    now: float,
) -> tuple[CanaryState, CanaryDecision]:
    """One look: the next state and the decision with its evidence (see the module)."""
    test = MixtureSPRT(policy.alpha, policy.margin)
    look = test.look(
        (champion.successes, champion.requests),
        (canary.successes, canary.requests),
        (state.p_harm, state.p_noninferior),
        (champion.variance, canary.variance),
    )
    p_harm = float(look.p_harm)
    p_noninf = float(look.p_noninferior)
    state = replace(state, looks=state.looks + 1, p_harm=p_harm, p_noninferior=p_noninf)
    breaches = [
        f"{name} {value:.4g} > {limit:g}"
        for name, value, limit in (
            ("error rate", guardrails.error_rate, policy.max_error_rate),
            ("p99 ms", guardrails.p99_ms, policy.max_p99_ms),
            ("score PSI", guardrails.score_psi, policy.max_score_psi),
        )
        if not math.isnan(value) and value > limit
    ]
    step_requests = canary.requests - state.step_start_requests
    evidence: dict[str, Any] = {
        "test": test.describe(),
        "metric": policy.metric,
        "alpha": policy.alpha,
        "margin": policy.margin,
        "champion": state.champion,
        "champion_requests": champion.requests,
        "champion_successes": champion.successes,
        "champion_rate": float(look.champion_rate),
        "champion_users": champion.users,
        "canary_users": canary.users,
        "variance": "user level (delta method), at least the binomial"
        if not (math.isnan(champion.variance) and math.isnan(canary.variance))
        else "binomial (requests independent)",
        "canary_requests": canary.requests,
        "canary_successes": canary.successes,
        "canary_rate": float(look.canary_rate),
        "difference": float(look.difference),
        "p_harm": p_harm,
        "p_noninferior": p_noninf,
        "look": state.looks,
        "step_percent": state.percent,
        "step_requests": step_requests,
        "min_requests_per_step": policy.min_requests_per_step,
        "guardrails": {
            "error_rate": [guardrails.error_rate, policy.max_error_rate],
            "p99_ms": [guardrails.p99_ms, policy.max_p99_ms],
            "score_psi": [guardrails.score_psi, policy.max_score_psi],
        },
        "seconds_since_start": now - state.started_at,
    }

    def done(action: str, percent: float, reason: str) -> tuple[CanaryState, CanaryDecision]:
        return replace(state, percent=percent, done=True), CanaryDecision(
            action, percent, reason, evidence
        )

    if breaches:
        return done("rollback", 0.0, "guardrail breached: " + "; ".join(breaches))
    if p_harm <= policy.alpha:
        return done(
            "rollback",
            0.0,
            f"canary worse: p_harm {p_harm:.3g} <= alpha {policy.alpha:g} "
            f"({look.canary_rate:.4f} vs {look.champion_rate:.4f})",
        )
    later = [p for p in policy.ramp if p > state.percent]
    next_percent = later[0] if later else 100.0
    if next_percent >= 100.0:
        if p_noninf <= policy.alpha and step_requests >= policy.min_requests_per_step:
            return done(
                "promote",
                100.0,
                f"not worse than the champion by {policy.margin:.0%}: p_noninferior "
                f"{p_noninf:.3g} <= alpha {policy.alpha:g}",
            )
        return state, CanaryDecision(
            "continue", state.percent, "waiting for evidence of non-inferiority", evidence
        )
    if step_requests < policy.min_requests_per_step:
        return state, CanaryDecision(
            "continue",
            state.percent,
            f"{step_requests} of {policy.min_requests_per_step} canary requests at this step",
            evidence,
        )
    ramped = replace(
        state, percent=next_percent, step_started_at=now, step_start_requests=canary.requests
    )
    return ramped, CanaryDecision(
        "ramp", next_percent, f"no harm after {step_requests} canary requests", evidence
    )


# -- reading the evidence ------------------------------------------------------------------------


def arm_stats(
    joined: Iterable[JoinedRequest], state: CanaryState, metric: str
) -> tuple[ArmStats, ArmStats, list[np.ndarray]]:
    """Champion and canary counts over complete joined requests since the canary started, and
    the canary's served scores (for the score guardrail)."""
    # Per arm, per user: [requests, successes]. A user's requests are not independent (one
    # user orders more than another, in both arms), so the test's variance is the user-level
    # one (clustered_variance), not the binomial of independent requests.
    by_user: dict[str, dict[str, list[int]]] = {state.champion: {}, state.version: {}}
    scores = []
    for request in joined:
        if request.ts < state.started_at or not request.complete:
            continue
        users = by_user.get(request.model_version)
        if users is None:
            continue
        hit = request.ordered if metric == "order_rate" else request.clicked | request.ordered
        counts = users.setdefault(request.user_id, [0, 0])
        counts[0] += 1
        counts[1] += int(bool(hit.any()))
        if request.model_version == state.version:
            scores.append(request.scores)
    return _arm(by_user[state.champion]), _arm(by_user[state.version]), scores


def _arm(users: dict[str, list[int]]) -> ArmStats:
    if not users:
        return ArmStats()
    counts = np.array(list(users.values()), dtype=np.int64)
    requests, successes = int(counts[:, 0].sum()), int(counts[:, 1].sum())
    return ArmStats(requests, successes, len(users), clustered_variance(counts[:, 0], counts[:, 1]))


def score_psi(scores: list[np.ndarray], min_scores: int = 2000) -> float:
    """PSI of the canary's served scores in the later half of its requests against the
    earlier half (deciles of the earlier half; NaN with fewer than ``min_scores`` a half: a
    hundred lists of 20; fewer make the PSI noise).

    Served scores are the top of each ranked list, so they cannot be compared with the
    training distribution, and lambdarank scores have no common scale across versions, so not
    with the champion's either: the guardrail asks whether the canary's own outputs move while
    it serves (a feature gone bad, a model unstable on live inputs)."""
    half = len(scores) // 2
    if half == 0:
        return math.nan
    earlier = np.concatenate(scores[:half])
    later = np.concatenate(scores[half:])
    if earlier.size < min_scores or later.size < min_scores:
        return math.nan
    edges = np.unique(np.quantile(earlier, np.linspace(0.1, 0.9, 9))).tolist()
    return float(psi(bin_counts(edges, later), bin_counts(edges, earlier)))


@dataclass(frozen=True)
class ServerCounters:
    """Cumulative request counters of a server's /metrics (for error rate and p99 windows)."""

    requests: float = 0.0
    errors: float = 0.0
    buckets: tuple[tuple[float, float], ...] = ()
    """(upper bound in seconds, cumulative count) of ``recsys_request_duration_seconds``."""


def parse_metrics(text: str) -> ServerCounters:
    requests = errors = 0.0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "recsys_requests_total":
                requests += sample.value
                if sample.labels.get("code", "OK") not in ("OK", "0"):
                    errors += sample.value
            elif sample.name == "recsys_request_duration_seconds_bucket":
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
    return ServerCounters(requests, errors, tuple(sorted(buckets.items())))


def guardrails_between(
    before: ServerCounters, after: ServerCounters, score_psi_value: float
) -> Guardrails:
    """Error rate and p99 (bucket upper bound) of the requests between two scrapes."""
    requests = after.requests - before.requests
    if requests <= 0:
        return Guardrails(score_psi=score_psi_value)
    previous = dict(before.buckets)
    window = [(le, count - previous.get(le, 0.0)) for le, count in after.buckets]
    total = window[-1][1] if window else 0.0
    p99 = math.nan
    if total > 0:
        p99 = next((le * 1000.0 for le, count in window if count >= 0.99 * total), math.nan)
    return Guardrails(
        error_rate=(after.errors - before.errors) / requests,
        p99_ms=p99,
        score_psi=score_psi_value,
    )


def decision_record(state: CanaryState, decision: CanaryDecision) -> dict[str, Any]:
    """What goes into the registry's decision history and MLflow."""
    return {
        "decision": f"canary-{decision.action}",
        "action": f"canary {state.name}/{state.version} {decision.percent:g}%",
        "reason": decision.reason,
        "evidence": dict(decision.evidence),
        "state": asdict(state),
    }
