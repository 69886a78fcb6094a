"""Does every scenario change what the served model's users do? A real server per scenario.

For each scenario: serve a private copy of the artifact root in this process (a real gRPC
server on a loopback port, result cache off), run ``recsys simulate``'s code path against it,
stop the server (flushing the exposure log), join exposures and outcome events, and print per
scenario: requests, CTR drawn before and after the onset, the CTR expected after the onset
(mean click probability of the impressions) against the same impressions in the unchanged
world (the scenario's effect without the draw's noise), and for ``broken-feature`` the share
of served user rows whose broken column is NaN before and after the onset. Needs Redis for
``broken-feature`` (skipped without ``--redis``).

    python -m benchmarks.bench_scenarios --artifacts DIR [--minutes 20] [--onset-minutes 10]
        [--speed 60] [--rate 40] [--redis redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import redis

from recsys.cli.main import main as recsys_main
from recsys.outcomes import JoinStats, iter_outcomes, join_outcomes
from recsys.serving.exposure import iter_exposure_lines
from recsys.serving.pipeline import open_pipeline
from recsys.serving.server import RunningServer
from recsys.settings import ServeSettings
from recsys.simulation.behaviour import MAX_DELAY_SECONDS
from recsys.simulation.scenarios import SCENARIOS, USER_ROW_TAIL
from recsys.simulation.simulator import (
    SimulatedWorld,
    SimulateSettings,
    Simulation,
    SimulationReport,
    load_simulated_world,
)


@dataclass
class Outcome:
    report: SimulationReport
    join: JoinStats
    nan_before: float
    nan_after: float


async def run_scenario(
    args: argparse.Namespace, world: SimulatedWorld, scenario: str, work: Path
) -> Outcome:
    root = work / "artifacts"
    shutil.copytree(args.artifacts, root, ignore=shutil.ignore_patterns("exposures"))
    prefix = f"bench-scenarios-{uuid.uuid4().hex}:"
    feature_store = ""
    if scenario == "broken-feature":
        feature_store = args.redis
        publish = ["features", "publish", "--artifacts", str(root)]
        assert (
            recsys_main([*publish, "--feature-store", feature_store, "--control-prefix", prefix])
            == 0
        )
    serve = ServeSettings(
        artifacts=root,
        port=0,
        metrics_port=0,
        cache_entries=0,
        exposure_dir=work / "exposures",
        feature_store=feature_store,
        feature_store_timeout_ms=50.0,
        control_prefix=prefix,
    )
    server = await RunningServer.start(serve, open_pipeline)
    try:
        await server.wait_ready()
        settings = SimulateSettings(
            target=f"127.0.0.1:{server.port}",
            minutes=args.minutes,
            onset_minutes=args.onset_minutes,
            speed=args.speed,
            rate=args.rate,
            users=args.users,
            seed=args.seed,
            scenario=scenario,
            outcomes=work / "outcomes",
            artifacts=root,
            feature_store=feature_store,
            control_prefix=prefix,
        )
        simulation = Simulation(settings, world)
        report = await simulation.run()
    finally:
        await server.stop()
        if feature_store:
            client = redis.Redis.from_url(feature_store)
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()
    records = [r for _p, _n, r in iter_exposure_lines(work / "exposures")]
    column = world.row_width - len(USER_ROW_TAIL)  # user_price_mean, the default broken column
    shares = []
    for after in (False, True):
        rows = [
            r["user_features"]
            for r in records
            if r["user_features"] is not None and (r["ts"] >= simulation.onset_epoch) == after
        ]
        shares.append(sum(row[column] is None for row in rows) / max(1, len(rows)))
    stats = JoinStats()
    late = MAX_DELAY_SECONDS / args.speed
    for _ in join_outcomes(
        records, iter_outcomes(work / "outcomes"), late_seconds=late, stats=stats
    ):
        pass
    return Outcome(report, stats, shares[0], shares[1])


async def run(args: argparse.Namespace) -> None:
    world = load_simulated_world(args.artifacts, "", "recsys:")
    print(
        f"{'scenario':<16} {'requests':>8} {'CTR before':>10} {'CTR after':>9} "
        f"{'expected':>8} {'unchanged':>9} {'effect':>7} {'NaN before':>10} {'NaN after':>9} "
        f"{'joined':>7} {'orphans':>7} {'late':>5}"
    )
    for scenario in args.scenarios:
        if scenario == "broken-feature" and not args.redis:
            print(f"{scenario:<16} skipped: needs --redis")
            continue
        with tempfile.TemporaryDirectory(prefix="bench-scenarios-") as tmp:
            out = await run_scenario(args, world, scenario, Path(tmp))
        r, after = out.report, out.report.after
        effect = after.expected_ctr / after.unchanged_ctr - 1 if after.unchanged_ctr else 0.0
        print(
            f"{scenario:<16} {r.requests:>8,} {r.before.ctr:>10.4f} {after.ctr:>9.4f} "
            f"{after.expected_ctr:>8.4f} {after.unchanged_ctr:>9.4f} {effect:>+7.1%} "
            f"{out.nan_before:>10.1%} {out.nan_after:>9.1%} {out.join.joined:>7,} "
            f"{out.join.orphans:>7} {out.join.late_dropped:>5}"
        )
    print("load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--onset-minutes", type=float, default=10.0)
    parser.add_argument("--speed", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=40.0)
    parser.add_argument("--users", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--redis", default="", help="redis://HOST:PORT/DB for broken-feature")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
