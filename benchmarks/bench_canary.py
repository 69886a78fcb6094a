"""How often the canary analysis rolls back a good canary or promotes a bad one, by simulation.

Each run is one canary driven through ``recsys.promotion.canary.decide`` exactly as the
controller drives it: at every look the next batch of requests is split between champion and
canary by the current ramp share, each request succeeds (a click) with its arm's probability,
and the analysis continues, ramps (5 -> 25 -> 50), promotes or rolls back. Scenarios:

- ``A/A``: the canary is the champion (same success probability): a rollback is a false
  rollback;
- ``worse by the margin``: the canary's rate is (1 - margin) x the champion's: a promotion is a
  false promotion;
- ``10% worse``: a clearly bad canary: how often and how fast it is rolled back;
- the same A/A runs judged by a fixed-n one-sided z-test peeked at every look (what a dashboard
  alert does), for comparison.

    python -m benchmarks.bench_canary [--runs 200] [--rate 0.4] [--per-look 2000]
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np

from recsys.promotion.canary import ArmStats, Guardrails, decide, start
from recsys.promotion.policy import CanaryPolicy


def simulate(
    policy: CanaryPolicy,
    champion_rate: float,
    canary_rate: float,
    runs: int,
    per_look: int,
    max_looks: int,
    seed: int,
) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    outcomes = {"promote": 0, "rollback": 0, "undecided": 0}
    looks_to_end: dict[str, list[int]] = {"promote": [], "rollback": []}
    naive_rollbacks = 0
    for _ in range(runs):  # one simulated canary per run
        state = start("ranker", "canary", "champion", policy.ramp[0], now=0.0)
        a = b = 0
        xa = xb = 0
        naive = False
        action = "undecided"
        for look in range(1, max_looks + 1):
            n_b = int(rng.binomial(per_look, state.percent / 100.0))
            n_a = per_look - n_b
            a, b = a + n_a, b + n_b
            xa += int(rng.binomial(n_a, champion_rate))
            xb += int(rng.binomial(n_b, canary_rate))
            if a and b and not naive:
                ra, rb = xa / a, xb / b
                se = math.sqrt(ra * (1 - ra) / a + rb * (1 - rb) / b)
                naive = se > 0 and (rb - ra) / se < -1.645
            state, decision = decide(
                policy, state, ArmStats(a, xa), ArmStats(b, xb), Guardrails(), float(look)
            )
            if state.done:
                action = decision.action
                looks_to_end[action].append(look)
                break
        outcomes[action] += 1
        naive_rollbacks += naive
    return {
        "promote": outcomes["promote"] / runs,
        "rollback": outcomes["rollback"] / runs,
        "undecided": outcomes["undecided"] / runs,
        "median_looks_promote": float(np.median(looks_to_end["promote"]))
        if looks_to_end["promote"]
        else math.nan,
        "median_looks_rollback": float(np.median(looks_to_end["rollback"]))
        if looks_to_end["rollback"]
        else math.nan,
        "naive_peeking_rollback": naive_rollbacks / runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--rate", type=float, default=0.4, help="champion's success rate")
    parser.add_argument("--per-look", type=int, default=2000, help="requests between looks")
    parser.add_argument("--max-looks", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    policy = CanaryPolicy()
    started = time.perf_counter()
    print(
        f"canary analysis: {args.runs} runs per scenario, champion rate {args.rate}, "
        f"{args.per_look} requests per look, at most {args.max_looks} looks; policy alpha "
        f"{policy.alpha}, margin {policy.margin:.0%}, ramp {list(policy.ramp)}, "
        f"{policy.min_requests_per_step} canary requests per step"
    )
    print(
        f"{'scenario':24s} {'promote':>8s} {'rollback':>9s} {'undecided':>10s} "
        f"{'looks to promote':>17s} {'looks to rollback':>18s} {'naive peeking rollback':>23s}"
    )
    scenarios = (
        ("A/A", 1.0),
        (f"worse by margin ({policy.margin:.0%})", 1.0 - policy.margin),
        ("10% worse", 0.9),
    )
    for n, (label, ratio) in enumerate(scenarios):
        r = simulate(
            policy,
            args.rate,
            args.rate * ratio,
            args.runs,
            args.per_look,
            args.max_looks,
            args.seed + n,
        )
        print(
            f"{label:24s} {r['promote']:8.3f} {r['rollback']:9.3f} {r['undecided']:10.3f} "
            f"{r['median_looks_promote']:17.1f} {r['median_looks_rollback']:18.1f} "
            f"{r['naive_peeking_rollback']:23.3f}"
        )
    print(f"took {time.perf_counter() - started:.1f}s")
    print("load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
