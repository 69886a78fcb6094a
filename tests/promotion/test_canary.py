"""Canary decisions: ramp on no harm, promote on non-inferiority, roll back on harm."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recsys.outcomes.join import JoinedRequest
from recsys.promotion.canary import (
    ArmStats,
    Guardrails,
    arm_stats,
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


def _request(user: str, version: str, clicked: bool, ts: float = 10.0) -> JoinedRequest:
    n = 3
    click = np.zeros(n, dtype=np.bool_)
    click[0] = clicked
    return JoinedRequest(
        request_id=f"{user}-{ts}", ts=ts, user_id=user, surface="home", model_version=version,
        exposures=(), sku_ids=np.arange(n, dtype=np.int64), scores=np.ones(n, dtype=np.float32),
        user_features=None, impressed=np.ones(n, dtype=np.bool_), clicked=click,
        ordered=np.zeros(n, dtype=np.bool_), complete=True,
    )  # fmt: skip


def test_arm_stats_count_users_and_give_the_user_level_variance() -> None:
    state = start("ranker", "v2", "v1", 5.0, now=0.0)
    # Champion: 40 users with one request each. Canary: 4 users with 10 requests each, every
    # request of a user clicked or none: the same 40 requests and 20 clicks, far less evidence.
    requests = [_request(f"a{u}", "v1", u % 2 == 0) for u in range(40)]
    requests += [_request(f"b{u}", "v2", u % 2 == 0, ts=10.0 + i) for u in range(4)
                 for i in range(10)]  # fmt: skip
    requests.append(_request("a0", "v1", True, ts=-1.0))  # before the canary: not counted
    champion, canary, _ = arm_stats(requests, state, "click_rate")
    assert (champion.requests, champion.successes, champion.users) == (40, 20, 40)
    assert (canary.requests, canary.successes, canary.users) == (40, 20, 4)
    binomial = 0.5 * 0.5 / 40
    assert champion.variance == pytest.approx(binomial * 40 / 39)
    assert canary.variance == pytest.approx(binomial * 10 * 4 / 3)  # design effect 10


def test_the_decision_says_which_variance_the_test_used() -> None:
    state = start("ranker", "v2", "v1", 5.0, now=0.0)
    clustered = ArmStats(1000, 300, users=50, variance=0.004)
    _, decision = decide(POLICY, state, ArmStats(20000, 8000), clustered, Guardrails(), 1.0)
    # 0.30 vs 0.40 would be harm with independent requests; 50 users are not enough to say so
    assert decision.action != "rollback"
    assert decision.evidence["variance"].startswith("user level")
    _, binomial = decide(
        POLICY, state, ArmStats(20000, 8000), ArmStats(1000, 300), Guardrails(), 1.0
    )
    assert binomial.action == "rollback"
    assert binomial.evidence["variance"].startswith("binomial")
