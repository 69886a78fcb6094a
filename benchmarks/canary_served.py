"""The canary analysis on a real server: A/A canaries (the false-rollback rate) and a canary
trained on shuffled labels (the false-promotion rate), each judged by the real controller.

For each built world in ``--artifacts`` (small worlds: ``recsys build --skus 4000 --users 1500
--dim 16 --seed S``), a copy of it is served by a ``recsys serve`` process (exposure log in the
copy's work directory, rotated every few seconds so each trial reads only its own files). A trial:

1. register a canary version through the registry (``ModelRegistry.register``, the path of
   ``recsys models register``): for ``A/A`` the production model's file itself (its trees and
   predictions identical; one ignored training parameter, ``data_random_seed``, differs so the
   content-addressed registry gives it a fresh version id); for ``worse`` a model retrained on
   the world's logged traffic with shuffled labels (``recsys.promotion.retrain``,
   ``shuffle_labels``, no warm start), registered the same way;
2. route it as the canary at the policy's first step (by user hash, the existing routing);
3. simulated users (``recsys.simulation.Simulation``, scenario ``none``, a fresh seed and outcome
   directory) request feeds and write impressions, clicks and orders;
4. the real :class:`~recsys.promotion.controller.CanaryController` looks every ``--look-seconds``
   at the logs (requests since the canary started), ramps, promotes or rolls back, or gives up
   at ``--max-seconds`` (undecided);
5. the simulation stops; a promoted worse canary is rolled back so production is the original
   model again.

Each trial is one JSON line in ``--results`` (written as it ends, so an interrupted run keeps
what it measured); the summary (rates with 95% Wilson intervals, time and requests to a
decision) is printed at the end, or from a results file with ``--summarize FILE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from recsys.artifacts import ArtifactRoot
from recsys.cli.loop import ServerProcess
from recsys.control.backends import open_store
from recsys.monitoring.statistics import wilson_interval
from recsys.promotion.canary import CanaryDecision
from recsys.promotion.controller import CanaryController, LogSources
from recsys.promotion.policy import CanaryPolicy
from recsys.promotion.retrain import retrain
from recsys.ranking.registry import ModelRegistry
from recsys.simulation.simulator import (
    SimulatedWorld,
    SimulateSettings,
    Simulation,
    load_simulated_world,
    longest_tail_seconds,
)

NAME = "ranker"
ROTATE_SECONDS = 5.0
"""The server's exposure files rotate this often; closed ones older than a trial are moved out."""
WARM_SECONDS = 30.0
"""Production-only traffic a world's worse model is retrained from (shuffled labels)."""
_SEED_PARAMETER = re.compile(r"\[data_random_seed: -?\d+\]")


@dataclass(frozen=True)
class ServedSettings:
    worlds: tuple[Path, ...]
    work: Path
    results: Path
    policy: CanaryPolicy
    policy_source: str
    aa_runs: int
    worse_runs: int
    users: int = 1500
    rate: float = 40.0
    speed: float = 60.0
    look_seconds: float = 3.0
    max_seconds: float = 300.0


@dataclass
class Trial:
    kind: str
    """``A/A`` or ``worse``."""
    world: str
    trial: int
    seed: int
    version: str
    champion: str
    outcome: str
    """promote, rollback or undecided."""
    reason: str
    wall_seconds: float
    simulated_minutes: float
    requests_judged: int
    champion_requests: int
    canary_requests: int
    champion_rate: float
    canary_rate: float
    requests_served: int
    failed_requests: int
    steps: list[float]
    load_average: float


def variant(model_text: str, seed: int) -> str:
    """The same trees with another ``data_random_seed`` (a training-only parameter)."""
    new, count = _SEED_PARAMETER.subn(f"[data_random_seed: {seed}]", model_text)
    if count != 1:
        raise ValueError("the model file has no [data_random_seed: N] parameter line")
    return new


async def start_server(artifacts: Path, exposures: Path, log: Path) -> ServerProcess:
    """``recsys serve`` as ``recsys loop`` starts it, its exposure files rotated every
    ``ROTATE_SECONDS`` (the flag's environment default, which the process inherits)."""
    variable = "RECSYS_EXPOSURE_MAX_AGE_SECONDS"
    before = os.environ.get(variable)
    os.environ[variable] = f"{ROTATE_SECONDS:g}"
    try:
        return await ServerProcess.start(artifacts, exposures, log)
    finally:
        if before is None:
            del os.environ[variable]
        else:
            os.environ[variable] = before


def archive_closed(exposures: Path, archive: Path) -> None:
    """Move the closed (compressed) exposure files out: the controller reads every file in the
    directory at each look, and earlier trials' records only cost it time."""
    archive.mkdir(parents=True, exist_ok=True)
    for path in exposures.glob("*.jsonl.gz"):
        if not path.with_suffix("").exists():  # compression finished
            path.rename(archive / path.name)


class World:
    """One world's copy, its server, registry and simulated users."""

    def __init__(self, settings: ServedSettings, source: Path, number: int) -> None:
        self.settings = settings
        self.label = source.name
        self.number = number
        self.dir = settings.work / f"world-{number}"
        self.root = self.dir / "artifacts"
        self.exposures = self.dir / "exposures"
        self.source = source
        self.server: ServerProcess | None = None

    async def __aenter__(self) -> World:
        if self.dir.exists():
            shutil.rmtree(self.dir)
        await asyncio.to_thread(
            shutil.copytree, self.source, self.root, ignore=shutil.ignore_patterns("mlflow")
        )
        self.store = open_store("", self.root)
        self.registry = ModelRegistry(ArtifactRoot(self.root), self.store, author="bench_canary")
        table, _ = self.registry.routing()
        self.champion = table.models[NAME].production
        self.champion_text = (self.root / "models" / NAME / self.champion / "model.txt").read_text()
        self.world: SimulatedWorld = await asyncio.to_thread(
            load_simulated_world, self.root, "", "recsys:"
        )
        await self.restart()
        return self

    async def restart(self) -> None:
        if self.server is not None:
            await self.server.stop()
        self.server = await start_server(self.root, self.exposures, self.dir / "serve.log")

    async def __aexit__(self, *_exc: object) -> None:
        if self.server is not None:
            await self.server.stop()
        self.store.close()

    def simulation(self, seed: int, outcomes: Path) -> Simulation:
        s = self.settings
        assert self.server is not None
        return Simulation(
            SimulateSettings(
                target=f"127.0.0.1:{self.server.port}",
                minutes=(s.max_seconds + 60.0) * s.speed / 60.0,
                users=s.users,
                scenario="none",
                speed=s.speed,
                seed=seed,
                rate=s.rate,
                outcomes=outcomes,
                artifacts=self.root,
                timeout_seconds=5.0,
            ),
            self.world,
        )

    def sources(self, outcomes: Path) -> LogSources:
        assert self.server is not None
        return LogSources(
            exposures=self.exposures,
            outcomes=outcomes,
            late_seconds=longest_tail_seconds(self.settings.speed),
            metrics_url=f"http://127.0.0.1:{self.server.metrics_port}/metrics",
        )

    async def trial(self, kind: str, number: int, model_text: str) -> Trial:
        s = self.settings
        seed = 1000 * self.number + number + (500 if kind == "worse" else 0)
        model_file = self.dir / f"model-{seed}.txt"
        model_file.write_text(variant(model_text, seed))
        version = await asyncio.to_thread(self.registry.register, NAME, model_file)
        archive_closed(self.exposures, self.dir / "exposures-earlier")
        outcomes = self.dir / f"trial-{seed}" / "outcomes"
        simulation = self.simulation(seed, outcomes)
        first = s.policy.ramp[0]
        steps = [first]
        controller = CanaryController(self.registry, s.policy, self.sources(outcomes))
        sim_task = asyncio.create_task(simulation.run())
        try:
            await asyncio.to_thread(
                self.registry.canary, NAME, version, first, note=f"bench_canary {kind} trial"
            )
            state = controller.begin(NAME, version, first)
            started = time.time()

            def say(decision: CanaryDecision) -> None:
                if decision.action == "ramp":
                    steps.append(decision.percent)

            state, decision = await asyncio.to_thread(
                controller.run,
                state,
                look_seconds=s.look_seconds,
                max_seconds=s.max_seconds,
                say=say,
            )
            wall = time.time() - started
        finally:
            sim_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sim_task
        outcome = decision.action if state.done else "undecided"
        if outcome == "promote" and kind == "worse":
            await asyncio.to_thread(self.registry.rollback, NAME, note="bench_canary: restore")
        elif outcome == "undecided":
            await asyncio.to_thread(self.registry.canary, NAME, version, 0, note="bench_canary")
        e = decision.evidence
        report = simulation.report
        return Trial(
            kind=kind,
            world=self.label,
            trial=number,
            seed=seed,
            version=version,
            champion=state.champion,
            outcome=outcome,
            reason=decision.reason,
            wall_seconds=wall,
            simulated_minutes=wall * s.speed / 60.0,
            requests_judged=int(e.get("champion_requests", 0)) + int(e.get("canary_requests", 0)),
            champion_requests=int(e.get("champion_requests", 0)),
            canary_requests=int(e.get("canary_requests", 0)),
            champion_rate=float(e.get("champion_rate", math.nan)),
            canary_rate=float(e.get("canary_rate", math.nan)),
            requests_served=report.requests,
            failed_requests=sum(report.errors.values()),
            steps=steps,
            load_average=os.getloadavg()[0],
        )

    async def worse_model(self) -> str:
        """A ranker trained with shuffled labels (no warm start: it learns nothing), as ``recsys
        loop --sabotage`` trains its challenger, on ``WARM_SECONDS`` of production-only traffic."""
        seed = 1000 * self.number + 999
        outcomes = self.dir / f"warm-{seed}" / "outcomes"
        since = time.time()
        task = asyncio.create_task(self.simulation(seed, outcomes).run())
        late = longest_tail_seconds(self.settings.speed)
        await asyncio.sleep(WARM_SECONDS + late)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        result = await asyncio.to_thread(
            retrain,
            self.registry,
            NAME,
            exposures=self.exposures,
            outcomes=outcomes,
            since=since,
            until=time.time() - late,
            late_seconds=late,
            shuffle_labels=True,
            warm_start=False,
        )
        print(
            f"{self.label}: worse model {NAME}/{result.version} trained on shuffled labels "
            f"({result.lineage['join']['requests_used']:,} logged requests; ndcg@20 on held-out "
            f"logged requests {result.metrics.get('ndcg@20.ranker', math.nan):.4f})",
            flush=True,
        )
        return (self.root / "models" / NAME / result.version / "model.txt").read_text()


def _quiet_closed_channel(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A cancelled simulation leaves its in-flight sessions to fail on the closed channel after
    the trial (their requests are not judged): not worth a traceback each."""
    if not isinstance(context.get("exception"), grpc.aio.UsageError):
        loop.default_exception_handler(context)


async def run_served(settings: ServedSettings) -> list[Trial]:
    asyncio.get_running_loop().set_exception_handler(_quiet_closed_channel)
    settings.work.mkdir(parents=True, exist_ok=True)
    trials: list[Trial] = []
    plans = (("A/A", settings.aa_runs), ("worse", settings.worse_runs))
    for kind, runs in plans:
        if runs <= 0:
            continue
        per_world = _share(runs, len(settings.worlds))
        for number, (source, count) in enumerate(zip(settings.worlds, per_world, strict=True)):
            if count == 0:
                continue
            async with World(settings, source, number) as world:
                text = world.champion_text
                if kind == "worse":
                    text = await world.worse_model()
                for k in range(count):
                    trial = await world.trial(kind, k, text)
                    trials.append(trial)
                    with settings.results.open("a") as out:
                        out.write(json.dumps(asdict(trial)) + "\n")
                    print(_trial_line(trial), flush=True)
    return trials


def _share(runs: int, worlds: int) -> list[int]:
    return [runs // worlds + (1 if i < runs % worlds else 0) for i in range(worlds)]


def _trial_line(t: Trial) -> str:
    return (
        f"{t.kind:5s} {t.world} #{t.trial:<3d} {t.outcome:9s} after {t.wall_seconds:6.1f} s wall "
        f"({t.simulated_minutes:5.1f} sim. min), {t.requests_judged:6,} requests judged "
        f"(champion {t.champion_rate:.4f}, canary {t.canary_rate:.4f}), steps "
        f"{'->'.join(f'{p:g}' for p in t.steps)}, {t.failed_requests} failed of "
        f"{t.requests_served:,}, load {t.load_average:.2f}; {t.reason}"
    )


def load_results(path: Path) -> list[Trial]:
    return [Trial(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def _pooled(runs: Sequence[Trial]) -> str:
    """Champion and canary order rates over all the runs' judged requests, and their ratio."""
    a = sum(t.champion_requests for t in runs)
    b = sum(t.canary_requests for t in runs)
    champion = sum(t.champion_rate * t.champion_requests for t in runs) / max(a, 1)
    canary = sum(t.canary_rate * t.canary_requests for t in runs) / max(b, 1)
    return (
        f"champion {champion:.4f} (n {a:,}), canary {canary:.4f} (n {b:,}), canary/champion "
        f"{canary / champion if champion else math.nan:.3f}"
    )


def summary(trials: Sequence[Trial]) -> list[str]:
    """Per kind: outcomes, the wrong decision's rate with its 95% Wilson interval, time and
    requests to a decision, pooled rates; then per world (its trials share the user split:
    the canary's users are those whose hash falls in its share, whatever the version)."""
    lines = []
    for kind, wrong in (("A/A", "rollback"), ("worse", "promote")):
        runs = [t for t in trials if t.kind == kind]
        if not runs:
            continue
        n = len(runs)
        counts = {
            o: sum(t.outcome == o for t in runs) for o in ("promote", "rollback", "undecided")
        }
        low, high = wilson_interval(counts[wrong], n, 1.96)
        label = "false rollback" if kind == "A/A" else "false promotion"
        lines.append(
            f"{kind}: {n} runs on {len({t.world for t in runs})} worlds: promoted "
            f"{counts['promote']}, rolled back {counts['rollback']}, undecided "
            f"{counts['undecided']}; {label} rate {counts[wrong] / n:.3f} "
            f"(95% Wilson {low:.3f}-{high:.3f})"
        )
        for outcome in ("promote", "rollback"):
            done = [t for t in runs if t.outcome == outcome]
            if done:
                lines.append(
                    f"  to {outcome}: median {statistics.median(t.wall_seconds for t in done):.1f}"
                    f" s wall ({statistics.median(t.simulated_minutes for t in done):.1f} sim. "
                    f"min), median {statistics.median(t.requests_judged for t in done):,.0f} "
                    f"requests judged; range {min(t.wall_seconds for t in done):.1f}-"
                    f"{max(t.wall_seconds for t in done):.1f} s"
                )
        guard = sum(t.outcome == "rollback" and "guardrail" in t.reason for t in runs)
        if guard:
            lines.append(f"  of the rollbacks, {guard} by a guardrail (the rest by the test)")
        lines.append(
            f"  pooled order rate per request: {_pooled(runs)}; failed requests "
            f"{sum(t.failed_requests for t in runs)} of {sum(t.requests_served for t in runs):,};"
            f" load average (1 min) during the trials {min(t.load_average for t in runs):.1f}-"
            f"{max(t.load_average for t in runs):.1f}"
        )
        for world in sorted({t.world for t in runs}):
            mine = [t for t in runs if t.world == world]
            outcomes = " ".join(t.outcome[0] for t in mine)
            lines.append(f"    {world}: {outcomes:12s} {_pooled(mine)}")
    return lines
