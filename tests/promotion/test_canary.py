"""Canary decisions: ramp on no harm, promote on non-inferiority, roll back on harm."""

from __future__ import annotations

import math

from recsys.promotion.canary import (
    ArmStats,
    Guardrails,
    decide,
    decision_record,
    guardrails_between,
    parse_metrics,
    start,
)
from recsys.promotion.policy import CanaryPolicy

POLICY = CanaryPolicy(min_requests_per_step=400)


def test_an_equal_canary_ramps_step_by_step_and_is_promoted() -> None:
    state = start("ranker", "new", "old", 5.0, now=0.0)
    actions = []
    champion = canary = 0
    for look in range(1, 200):
        champion += 4000
        canary += 2000
        state, decision = decide(
            POLICY,
            state,
            ArmStats(champion, int(champion * 0.4)),
            ArmStats(canary, int(canary * 0.4)),
            Guardrails(error_rate=0.0, p99_ms=20.0, score_psi=0.01),
            now=float(look),
        )
        actions.append((decision.action, decision.percent))
        if state.done:
            break
    assert [a for a in actions if a[0] != "continue"] == [
        ("ramp", 25.0),
        ("ramp", 50.0),
        ("promote", 100.0),
    ]
    assert decision.evidence["p_noninferior"] <= 0.05
    record = decision_record(state, decision)
    assert record["decision"] == "canary-promote"
    assert record["evidence"]["test"].startswith("mixture SPRT")


def test_a_worse_canary_is_rolled_back() -> None:
    state = start("ranker", "new", "old", 5.0, now=0.0)
    state, decision = decide(
        POLICY,
        state,
        ArmStats(20000, 8000),
        ArmStats(1000, 300),
        Guardrails(),
        now=1.0,
    )
    assert decision.action == "rollback"
    assert decision.percent == 0.0
    assert "canary worse" in decision.reason
    assert state.done


def test_a_guardrail_breach_rolls_back_at_once() -> None:
    state = start("ranker", "new", "old", 5.0, now=0.0)
    _, decision = decide(
        POLICY, state, ArmStats(10, 4), ArmStats(1, 0), Guardrails(score_psi=0.9), now=1.0
    )
    assert decision.action == "rollback"
    assert "score PSI 0.9 > 0.25" in decision.reason


def test_too_few_requests_continue() -> None:
    state = start("ranker", "new", "old", 5.0, now=0.0)
    _, decision = decide(POLICY, state, ArmStats(100, 40), ArmStats(10, 4), Guardrails(), 1.0)
    assert decision.action == "continue"
    assert "10 of 400" in decision.reason


METRICS = """# TYPE recsys_requests counter
recsys_requests_total{{code="OK"}} {ok}
recsys_requests_total{{code="UNAVAILABLE"}} {bad}
# TYPE recsys_request_duration_seconds histogram
recsys_request_duration_seconds_bucket{{le="0.01"}} {fast}
recsys_request_duration_seconds_bucket{{le="0.1"}} {total}
recsys_request_duration_seconds_bucket{{le="+Inf"}} {total}
recsys_request_duration_seconds_count {total}
recsys_request_duration_seconds_sum 1.0
"""


def test_error_rate_and_p99_come_from_two_scrapes_of_the_metrics() -> None:
    before = parse_metrics(METRICS.format(ok=100, bad=0, fast=100, total=100))
    after = parse_metrics(METRICS.format(ok=1090, bad=10, fast=1000, total=1100))
    guardrails = guardrails_between(before, after, 0.1)
    assert math.isclose(guardrails.error_rate, 10 / 1000)
    assert guardrails.p99_ms == 100.0  # 900 of 1000 under 10 ms: the 99th under 100 ms
    assert guardrails.score_psi == 0.1
