"""`recsys simulate`: drive a real server like the mobile backend and write outcome events.

recsys simulate --target 127.0.0.1:50051 --minutes 30 [--users N] [--scenario NAME]
                [--onset-minutes M] [--speed X] [--seed S] [--outcomes DIR | --outcome-sink URL]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from recsys.cli.common import CliError, control_plane_arguments, redis_auth
from recsys.settings import env_default
from recsys.simulation.scenarios import SCENARIOS


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from recsys.outcomes import DEFAULT_STREAM
    from recsys.simulation.simulator import SimulateSettings

    d = SimulateSettings(target="")
    p = subparsers.add_parser(
        "simulate",
        parents=[control_plane_arguments()],
        help="drive a server on this machine with simulated users and write what they do",
        description="Simulated users (the world's hidden tastes) ask a running server for "
        "feeds over gRPC and react to each page: impressions, clicks and orders, written as "
        "outcome events (docs/outcomes.md). A scenario changes the world at the onset; the "
        "served models do not change. Loopback targets only.",
    )
    p.add_argument("--target", required=True, help="the server, HOST:PORT on this machine")
    p.add_argument("--minutes", type=float, default=d.minutes, help="simulated minutes of traffic")
    p.add_argument("--users", type=int, default=d.users, help="users drawn from the world")
    p.add_argument(
        "--scenario", default=d.scenario, help=f"one of {', '.join(SCENARIOS)} (default none)"
    )
    p.add_argument(
        "--onset-minutes",
        type=float,
        default=d.onset_minutes,
        help="simulated minutes after the start when the scenario's change happens",
    )
    p.add_argument("--speed", type=float, default=d.speed, help="simulated seconds per wall second")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--rate", type=float, default=d.rate, help="sessions per wall second at the busiest hour"
    )
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="sessions at once")
    p.add_argument(
        "--start-hour", type=float, default=d.start_hour, help="simulated local time at the start"
    )
    p.add_argument("--max-requests", type=int, default=d.max_requests, help="at most this many")
    p.add_argument("--num-results", type=int, default=d.num_results)
    p.add_argument(
        "--timeout", type=float, default=d.timeout_seconds, help="seconds per Recommend call"
    )
    sink = p.add_mutually_exclusive_group()
    sink.add_argument(
        "--outcomes",
        type=Path,
        default=None,
        help="directory of the outcome files (default: outcomes/ beside the artifact root)",
    )
    sink.add_argument(
        "--outcome-sink",
        default=env_default("outcome_sink", ""),
        help="redis://[USER@]HOST:PORT/DB: events to a Redis Stream instead, as that ACL user "
        "with --redis-password-file (default: $RECSYS_OUTCOME_SINK)",
    )
    p.add_argument("--outcome-stream", default=DEFAULT_STREAM, help="stream key (%(default)s)")
    p.add_argument(
        "--feature-store",
        default=env_default("feature_store", ""),
        help="the online feature store the server reads (broken-feature corrupts one column "
        "there and restores it; default $RECSYS_FEATURE_STORE)",
    )
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> int:
    from recsys.simulation.scenarios import UnknownScenario, make_scenario
    from recsys.simulation.simulator import (
        SimulateSettings,
        Simulation,
        SimulationError,
        load_simulated_world,
    )

    settings = SimulateSettings(
        target=args.target,
        minutes=args.minutes,
        users=args.users,
        scenario=args.scenario,
        onset_minutes=args.onset_minutes,
        speed=args.speed,
        seed=args.seed,
        rate=args.rate,
        concurrency=args.concurrency,
        start_hour=args.start_hour,
        max_requests=args.max_requests,
        num_results=args.num_results,
        outcomes=args.outcomes,
        outcome_sink=args.outcome_sink,
        outcome_stream=args.outcome_stream,
        artifacts=args.artifacts,
        control=args.control,
        control_prefix=args.control_prefix,
        feature_store=args.feature_store,
        timeout_seconds=args.timeout,
        redis_auth=redis_auth(args),
    )
    try:
        settings.check()
        make_scenario(settings.scenario)
        world = load_simulated_world(
            settings.artifacts, settings.control, settings.control_prefix, settings.redis_auth
        )
        simulation = Simulation(settings, world, say=print)
        print(
            f"simulating {simulation.plan.sessions:,} sessions ({simulation.plan.requests:,} "
            f"requests at most) against {settings.target}"
        )
        report = asyncio.run(simulation.run())
    except (SimulationError, UnknownScenario) as e:
        raise CliError(str(e)) from e
    for line in report.lines():
        print(line)
    if report.requests == 0 and report.errors:
        print(f"recsys: no request to {settings.target} succeeded", file=sys.stderr)
        return 1
    return 0
