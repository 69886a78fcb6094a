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

``--served`` runs the canaries on real servers instead (``benchmarks/canary_served.py``): small
built worlds, the production model canaried against itself (A/A) and a model trained on
shuffled labels, simulated users, the real canary controller reading the logs:

    recsys build --out /tmp/cw/s21 --skus 4000 --users 1500 --dim 16 --seed 21   # and 22, 23
    python -m benchmarks.bench_canary --served --runs 50 --worse-runs 50 \
        --artifacts /tmp/cw/s21 /tmp/cw/s22 /tmp/cw/s23 [--policy benchmarks/canary_policy.toml]
    python -m benchmarks.bench_canary --summarize RESULTS.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.canary_served import ServedSettings, load_results, run_served, summary
from recsys.promotion.canary import ArmStats, Guardrails, decide, start
from recsys.promotion.policy import CanaryPolicy, load_policy

SERVED_POLICY = Path(__file__).with_name("canary_policy.toml")


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
    served = parser.add_argument_group("served mode (real servers, simulated users)")
    served.add_argument("--served", action="store_true", help="canaries on real servers")
    served.add_argument("--artifacts", type=Path, nargs="+", default=[], help="built worlds")
    served.add_argument("--worse-runs", type=int, default=0, help="shuffled-label canaries")
    served.add_argument("--policy", type=Path, default=SERVED_POLICY)
    served.add_argument("--users", type=int, default=1500, help="simulated users per trial")
    served.add_argument("--sessions", type=float, default=40.0, help="sessions per wall second")
    served.add_argument("--speed", type=float, default=60.0, help="simulated s per wall s")
    served.add_argument("--look-seconds", type=float, default=3.0)
    served.add_argument("--max-seconds", type=float, default=300.0, help="per trial, wall")
    served.add_argument("--work", type=Path, default=None, help="copies and logs (default: tmp)")
    served.add_argument("--results", type=Path, default=None, help="JSON lines, one per trial")
    served.add_argument("--summarize", type=Path, default=None, help="summary of a results file")
    args = parser.parse_args()
    if args.summarize is not None:
        print("\n".join(summary(load_results(args.summarize))))
        return
    if args.served:
        main_served(args)
        return
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


def main_served(args: argparse.Namespace) -> None:
    if not args.artifacts:
        raise SystemExit("--served: --artifacts: expected one or more built worlds")
    for flag in ("sessions", "speed", "look_seconds", "max_seconds"):
        if not getattr(args, flag) > 0:
            raise SystemExit(f"--{flag.replace('_', '-')}: expected > 0")
    policy = load_policy(args.policy)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-canary-"))
    results = args.results or work / "results.jsonl"
    settings = ServedSettings(
        worlds=tuple(args.artifacts),
        work=work,
        results=results,
        policy=policy.canary,
        policy_source=str(args.policy),
        aa_runs=args.runs,
        worse_runs=args.worse_runs,
        users=args.users,
        rate=args.sessions,
        speed=args.speed,
        look_seconds=args.look_seconds,
        max_seconds=args.max_seconds,
    )
    c = policy.canary
    print(
        f"served canaries: {args.runs} A/A and {args.worse_runs} shuffled-label runs on "
        f"{len(args.artifacts)} worlds; policy {args.policy} ({c.metric}, alpha {c.alpha}, "
        f"margin {c.margin:.0%}, ramp {list(c.ramp)}, {c.min_requests_per_step} canary requests "
        f"per step); {args.sessions:g} sessions/s, speed {args.speed:g}, looks every "
        f"{args.look_seconds:g} s, at most {args.max_seconds:g} s a trial; results -> {results}",
        flush=True,
    )
    started = time.perf_counter()
    trials = asyncio.run(run_served(settings))
    print("\n".join(summary(trials)))
    print(f"took {time.perf_counter() - started:.0f}s")
    print("load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
