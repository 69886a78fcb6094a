"""`recsys loop`: the whole loop on the demo world, in one process, with a timeline.

A real server (gRPC on a loopback port, the file control store in the artifact root, exposure
log in ``--workdir``) serves simulated users (`recsys simulate`'s code, with a drift scenario
at ``--onset-minutes``); the monitor compares production's click-through rate in a reference
window with the latest window (99% Wilson intervals apart: drift); then a challenger is
retrained on the logged traffic since the drifted window began (``--sabotage``: on shuffled
labels), gated against production on the held-out logged requests, put on a canary and judged
by the canary controller (sequential test, guardrails) until it is promoted or rolled back
(``--force-canary``: a challenger the gates refused goes on the canary anyway, recorded as
forced, so a sabotaged one shows the canary's rollback).
Every step goes into the timeline, the registry's histories and MLflow; the run ends with the
simulator's failed-request count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.artifacts import ArtifactRoot
from recsys.cli.common import CliError, tracking_arguments, tracking_settings
from recsys.control.backends import open_store
from recsys.promotion.controller import LogSources
from recsys.promotion.loop import LoopController, LoopSettings
from recsys.promotion.policy import Policy, load_policy
from recsys.promotion.tracking import TrackingError, open_tracker
from recsys.ranking.registry import ModelRegistry
from recsys.settings import DEFAULT_ARTIFACTS, env_default
from recsys.simulation.scenarios import SCENARIOS
from recsys.simulation.simulator import (
    SimulateSettings,
    Simulation,
    load_simulated_world,
    longest_tail_seconds,
)

NAME = "ranker"
READY_SECONDS = 300.0
"""How long the server may take to load the artifacts and report SERVING."""


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "loop",
        parents=[tracking_arguments()],
        help="serve, simulate a drift, detect it, retrain, gate, canary, promote or roll back",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--artifacts",
        type=Path,
        default=Path(env_default("artifacts", str(DEFAULT_ARTIFACTS))),
        help="a built artifact root (its routing is changed by the run)",
    )
    p.add_argument("--workdir", type=Path, default=None, help="logs (default: beside the root)")
    p.add_argument("--scenario", default="taste-shift", choices=sorted(SCENARIOS))
    p.add_argument("--sabotage", action="store_true", help="retrain on shuffled labels")
    p.add_argument(
        "--force-canary",
        action="store_true",
        help="when the gates refuse the challenger, put it on the canary anyway (recorded as "
        "forced, like `models canary --force`): the canary controller must roll it back",
    )
    p.add_argument("--policy", type=Path, default=None, help="promotion policy (TOML)")
    p.add_argument("--minutes", type=float, default=600.0, help="simulated minutes at most")
    p.add_argument("--onset-minutes", type=float, default=30.0)
    p.add_argument("--speed", type=float, default=60.0, help="simulated seconds per wall second")
    p.add_argument("--rate", type=float, default=60.0, help="sessions per wall second at peak")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--window-requests",
        type=int,
        default=1500,
        help="production requests in the monitor's reference and current windows",
    )
    p.add_argument(
        "--retrain-requests",
        type=int,
        default=6000,
        help="logged requests after the drift is flagged before retraining",
    )
    p.add_argument("--look-seconds", type=float, default=5.0, help="between canary looks")
    p.set_defaults(func=_run)


@dataclass
class Timeline:
    started: float
    speed: float
    onset_wall: float
    events: list[tuple[float, str]] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)

    def say(self, text: str, mark: str = "") -> None:
        now = time.time()
        self.events.append((now, text))
        if mark:
            self.marks[mark] = now
        wall = now - self.started
        print(
            f"[{wall:7.1f}s wall | minute {wall * self.speed / 60:6.1f}] {text}",
            flush=True,
        )


def _run(args: argparse.Namespace) -> int:
    if not (args.artifacts / "control").is_dir():
        raise CliError(f"--artifacts {args.artifacts}: not a built root; run `recsys build`")
    for flag in ("minutes", "speed", "rate", "look_seconds"):
        if not getattr(args, flag) > 0:
            raise CliError(f"--{flag.replace('_', '-')}: expected > 0")
    workdir: Path = args.workdir or args.artifacts.absolute().parent / "loop"
    return asyncio.run(_loop(args, workdir, load_policy(args.policy)))


async def _loop(args: argparse.Namespace, workdir: Path, policy: Policy) -> int:
    artifacts: Path = args.artifacts
    exposures, outcomes = workdir / "exposures", workdir / "outcomes"
    server = await ServerProcess.start(artifacts, exposures, workdir / "serve.log")
    store = open_store("", artifacts)
    registry = ModelRegistry(ArtifactRoot(artifacts), store, author="recsys loop")
    tracker = None
    with contextlib.suppress(TrackingError):
        tracker = await asyncio.to_thread(
            open_tracker, tracking_settings(args, artifacts), lambda m: print(f"warning: {m}")
        )
    world = await asyncio.to_thread(load_simulated_world, artifacts, "", "recsys:")
    simulation = Simulation(
        SimulateSettings(
            target=f"127.0.0.1:{server.port}",
            minutes=args.minutes,
            users=args.users,
            scenario=args.scenario,
            onset_minutes=args.onset_minutes,
            speed=args.speed,
            seed=args.seed,
            rate=args.rate,
            outcomes=outcomes,
            artifacts=artifacts,
            timeout_seconds=5.0,
        ),
        world,
    )
    started = time.time()
    timeline = Timeline(started, args.speed, started + args.onset_minutes * 60 / args.speed)
    sources = LogSources(
        exposures=exposures,
        outcomes=outcomes,
        late_seconds=longest_tail_seconds(args.speed),
        metrics_url=f"http://127.0.0.1:{server.metrics_port}/metrics",
    )
    table, _ = registry.routing()
    champion = table.models[NAME].production
    timeline.say(
        f"serving {NAME}/{champion} on 127.0.0.1:{server.port}; simulating {args.scenario} "
        f"(onset at minute {args.onset_minutes:g}){' with SABOTAGE' if args.sabotage else ''}"
    )
    sim_task = asyncio.create_task(simulation.run())
    outcome = "undecided"
    try:
        outcome = await _steps(args, registry, policy, sources, timeline, tracker, sim_task)
    finally:
        sim_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sim_task
        await server.stop()
        store.close()
        if tracker is not None:
            await asyncio.to_thread(_sync_aliases, tracker, registry)
    report = simulation.report
    failed = sum(report.errors.values())
    timeline.say(
        f"done: {outcome}; {report.requests:,} requests served, {failed} failed "
        f"({dict(report.errors) or 'none'})"
    )
    _summary(timeline, outcome, failed)
    return 0


async def _steps(
    args: argparse.Namespace,
    registry: ModelRegistry,
    policy: Policy,
    sources: LogSources,
    timeline: Timeline,
    tracker: Any,
    sim_task: asyncio.Task[Any],
) -> str:
    """The shared loop controller (recsys/promotion/loop.py), one look at a time, until the
    challenger is refused, promoted or rolled back or the simulated traffic ends."""
    table, _ = registry.routing()
    champion = table.models[NAME].production
    controller = LoopController(
        registry,
        policy,
        sources,
        LoopSettings(
            name=NAME,
            window_requests=args.window_requests,
            retrain_requests=args.retrain_requests,
            shuffle_labels=args.sabotage,
            force_canary=args.force_canary,
        ),
        say=lambda text, mark: timeline.say(text, mark=mark),
        tracker=tracker,
        since=timeline.started,
    )
    onset_said = False
    while True:
        judging = controller.judging.get(NAME)
        await asyncio.sleep(args.look_seconds if judging else 2.0)
        if sim_task.done():
            if judging:
                return f"canary {NAME}/{judging.version} undecided at {judging.percent:g}%"
            if "drift" in timeline.marks:
                return f"simulation ended before a challenger was judged; production {champion}"
            return "simulation ended before drift was flagged"
        if not onset_said and time.time() >= timeline.onset_wall:
            timeline.say(f"onset: the world changes ({args.scenario})", mark="onset")
            onset_said = True
        for outcome in await asyncio.to_thread(controller.look):
            return outcome.text


def _sync_aliases(tracker: Any, registry: ModelRegistry) -> None:
    table, _ = registry.routing()
    route = table.models[NAME]
    with contextlib.suppress(TrackingError):
        tracker.sync_aliases(registry.root, NAME, route.production, route.canary)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """``recsys serve`` in its own process: the controller's retraining, joins and gates hold
    this process's GIL for seconds, which must not stall the event loop that serves."""

    process: asyncio.subprocess.Process
    port: int
    metrics_port: int

    @classmethod
    async def start(cls, artifacts: Path, exposures: Path, log: Path) -> ServerProcess:
        port, metrics_port = _free_port(), _free_port()
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "recsys.cli", "serve", "--artifacts", str(artifacts),
                "--port", str(port), "--metrics-port", str(metrics_port),
                "--cache-entries", "0", "--exposure-dir", str(exposures),
                "--shutdown-grace-seconds", "0", "--drain-seconds", "5",
                stdout=out, stderr=out,
            )  # fmt: skip
        server = cls(process, port, metrics_port)
        await server._wait_serving(log)
        return server

    async def _wait_serving(self, log: Path) -> None:
        deadline = time.monotonic() + READY_SECONDS
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:  # bounded: the server loads, then serves
                if self.process.returncode is not None:
                    raise CliError(f"recsys serve exited {self.process.returncode}; see {log}")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.5)
        raise CliError(f"recsys serve did not become ready in {READY_SECONDS:g}s; see {log}")

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 30.0)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


def _summary(timeline: Timeline, outcome: str, failed: int) -> None:
    marks = timeline.marks
    print("\nsummary")
    print(f"  outcome: {outcome}")
    onset = marks.get("onset", timeline.onset_wall)
    speed = timeline.speed

    def span(a: float, b: float) -> str:
        return f"{b - a:.1f} s wall ({(b - a) * speed / 60:.1f} simulated minutes)"

    if "drift" in marks:
        print(f"  drift onset -> flagged: {span(onset, marks['drift'])}")
    if "promote" in marks:
        print(f"  drift onset -> promoted: {span(onset, marks['promote'])}")
    if "rollback" in marks and "canary" in marks:
        print(f"  bad canary start -> rolled back: {span(marks['canary'], marks['rollback'])}")
    if "refused" in marks:
        print("  the gates refused the challenger before any traffic")
    print(f"  failed requests: {failed}")
