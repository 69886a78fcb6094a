"""``recsys simulate``: drive a real server over gRPC like the mobile backend, and write what the
users do with every response as outcome events.

One run: load the world behind the served index and regenerate its hidden truth
(:func:`load_simulated_world`), plan the sessions from the seed (:mod:`.traffic`), then, for
``minutes`` simulated minutes (``speed`` simulated seconds per wall second), start each session
at its time (at most ``concurrency`` at once, over one ``grpc.aio`` channel), ask for the feed
(and its refreshes), and draw each page's impressions, clicks and orders (:mod:`.behaviour`).
Each event is written when its simulated time comes, so a click minutes after its impression
reaches the log minutes (divided by ``speed``) after it. At ``onset_minutes`` the scenario's
world replaces the original for every later page, and a feature fault, if any, is injected
into the online store (restored when the run ends, however it ends). The run ends when the time
is up and the last drawn event is written: bounded by ``minutes``, ``max_requests`` and the
longest event delay (15 simulated minutes).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import ipaddress
import itertools
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt

from recsys.artifacts import ArtifactError, ArtifactRoot
from recsys.control.backends import open_store
from recsys.control.store import ROUTING
from recsys.outcomes import (
    DEFAULT_STREAM,
    EventKind,
    OutcomeEvent,
    OutcomeLog,
    default_outcome_dir,
    open_outcome_writer,
)
from recsys.ranking.features import load_feature_tables, user_row_width
from recsys.settings import DEFAULT_ARTIFACTS, RedisAuth
from recsys.simulation.behaviour import (
    MAX_DELAY_SECONDS,
    Page,
    Reaction,
    click_probability,
    page_logits,
    react,
)
from recsys.simulation.feature_fault import OnlineFeatureFault
from recsys.simulation.scenarios import Scenario, Shift, make_scenario
from recsys.simulation.traffic import PLATFORMS, SURFACES, TrafficPlan, plan_traffic
from recsys.v1 import recommender_pb2, recommender_pb2_grpc
from recsys.world import InteractionLog, load_world
from recsys.worldgen import ResponseBias, WorldTruth, calibrated_bias, world_truth

log = logging.getLogger(__name__)

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WRITE_INTERVAL_SECONDS = 0.1


class SimulationError(ValueError):
    """A setting or an environment the run cannot work with; the message names it."""


@dataclass(frozen=True)
class SimulateSettings:
    target: str
    minutes: float = 10.0
    """Simulated minutes of traffic."""
    users: int = 1_000
    scenario: str = "none"
    onset_minutes: float = 5.0
    """Simulated minutes after the start when the scenario's change happens."""
    speed: float = 60.0
    """Simulated seconds per wall second."""
    seed: int = 1
    rate: float = 20.0
    """Sessions per wall second at the busiest hour."""
    concurrency: int = 32
    start_hour: float = 11.5
    """Simulated local time of day at the start (the lunch peak is at 12:30)."""
    max_requests: int = 100_000
    num_results: int = 20
    outcomes: Path | None = None
    """Directory of the outcome files; None: ``outcomes/`` beside the artifact root."""
    outcome_sink: str = ""
    """redis://HOST:PORT/DB: events to the Redis Stream ``outcome_stream`` instead of files."""
    outcome_stream: str = DEFAULT_STREAM
    artifacts: Path = DEFAULT_ARTIFACTS
    control: str = ""
    control_prefix: str = "recsys:"
    feature_store: str = ""
    """The online feature store the server reads (``broken-feature`` corrupts it)."""
    redis_auth: RedisAuth = field(default_factory=RedisAuth)
    """The password file (and CA) of the Redis user the control and outcome URLs name."""
    timeout_seconds: float = 2.0

    def check(self) -> None:
        check_loopback(self.target)
        for name in ("minutes", "speed", "rate", "timeout_seconds"):
            value = getattr(self, name)
            if not value > 0 or value != value or value == float("inf"):
                raise SimulationError(f"--{name.replace('_', '-')} is {value}; expected > 0")
        if self.onset_minutes < 0:
            raise SimulationError(f"--onset-minutes is {self.onset_minutes}; expected >= 0")
        for name in ("users", "concurrency", "max_requests", "num_results"):
            if getattr(self, name) < 1:
                raise SimulationError(
                    f"--{name.replace('_', '-')} is {getattr(self, name)}; expected >= 1"
                )
        if not 0 <= self.start_hour < 24:
            raise SimulationError(f"--start-hour is {self.start_hour}; expected 0..24")
        if self.outcome_sink and not self.outcome_sink.startswith(("redis://", "rediss://")):
            raise SimulationError(
                f"--outcome-sink {self.outcome_sink!r}: expected redis://HOST:PORT/DB"
            )


def check_loopback(target: str) -> tuple[str, int]:
    """``HOST:PORT`` with a loopback host; anything else raises :class:`SimulationError`."""
    host, sep, port_text = target.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not sep or not 0 < port < 65536:
        raise SimulationError(f"--target {target!r}: expected HOST:PORT")
    loopback = host in LOOPBACK_NAMES
    if not loopback:
        with contextlib.suppress(ValueError):
            loopback = ipaddress.ip_address(host).is_loopback
    if not loopback:
        raise SimulationError(
            f"--target {target!r}: the simulator only drives a server on this machine "
            "(127.0.0.1, localhost or [::1])"
        )
    return host, port


@dataclass(frozen=True)
class SimulatedWorld:
    """The world behind the served index, with its hidden truth and the build's calibration."""

    truth: WorldTruth
    log: InteractionLog
    bias: ResponseBias
    features_version: str
    user_ids: npt.NDArray[np.str_]
    row_width: int
    """Columns of a user's row in the online feature store."""


def load_simulated_world(
    artifacts: Path, control: str, control_prefix: str, auth: RedisAuth | None = None
) -> SimulatedWorld:
    """The routed index's world, its truth regenerated from the seed and checked against the
    saved catalogue (a world built by other code would not match: refused)."""
    store = open_store(control, artifacts, prefix=control_prefix, auth=auth)
    try:
        routing = store.read(ROUTING)
    finally:
        store.close()
    index = None if routing is None else routing.body.get("index")
    if not isinstance(index, str):
        raise SimulationError(f"--artifacts {artifacts}: no routing document naming an index")
    root = ArtifactRoot(artifacts)
    try:
        lineage = root.lineage(index, verify_files=False)
    except ArtifactError as e:
        raise SimulationError(f"--artifacts {artifacts}: {e}") from e
    world = load_world(lineage.world_dir)
    truth = world_truth(world.meta)
    saved = world.catalogue
    if not (
        np.array_equal(truth.catalogue.item_price, saved.item_price)
        and np.array_equal(truth.catalogue.restaurant_lat, saved.restaurant_lat)
    ):
        raise SimulationError(
            f"world {lineage.world_version}: its hidden truth does not regenerate from seed "
            f"{world.meta.seed} (built by another version of the world generator)"
        )
    tables = load_feature_tables(lineage.features_dir, saved)
    return SimulatedWorld(
        truth=truth,
        log=world.log,
        bias=calibrated_bias(truth, world.log),
        features_version=lineage.features_version,
        user_ids=tables.user_ids,
        row_width=user_row_width(tables.dim),
    )


@dataclass
class PhaseCounts:
    """Requests answered and events drawn, before or after the onset."""

    requests: int = 0
    items: int = 0
    impressions: int = 0
    clicks: int = 0
    orders: int = 0
    expected_clicks: float = 0.0
    """Sum of the click probabilities of the impressions (the CTR without the draw's noise)."""
    unchanged_clicks: float = 0.0
    """The same, had the world not changed at the onset (the scenario's effect, noise-free)."""

    @property
    def ctr(self) -> float:
        return self.clicks / self.impressions if self.impressions else 0.0

    @property
    def expected_ctr(self) -> float:
        return self.expected_clicks / self.impressions if self.impressions else 0.0

    @property
    def unchanged_ctr(self) -> float:
        return self.unchanged_clicks / self.impressions if self.impressions else 0.0

    @property
    def order_rate(self) -> float:
        return self.orders / self.clicks if self.clicks else 0.0


@dataclass
class SimulationReport:
    scenario: str
    summary: str
    sessions_planned: int = 0
    sessions: int = 0
    requests: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    """Failed requests by gRPC status code."""
    events: Counter[str] = field(default_factory=Counter)
    """Events written, by kind."""
    write_errors: int = 0
    before: PhaseCounts = field(default_factory=PhaseCounts)
    after: PhaseCounts = field(default_factory=PhaseCounts)
    fault_rows: int = 0
    restored_rows: int = 0
    wall_seconds: float = 0.0
    simulated_minutes: float = 0.0
    outcomes: str = ""
    """Where the events went."""
    late_seconds: float = 0.0
    """Wall seconds from a response to its last possible event: the join's late window."""

    def lines(self) -> list[str]:
        out = [
            f"scenario {self.scenario}: {self.summary}",
            f"{self.sessions:,} sessions, {self.requests:,} requests, "
            f"{sum(self.errors.values()):,} errors"
            + (
                f" ({', '.join(f'{k} {v}' for k, v in sorted(self.errors.items()))})"
                if self.errors
                else ""
            ),
            "events: "
            + ", ".join(
                f"{kind} {self.events[kind]:,}" for kind in ("impression", "click", "order")
            )
            + f" -> {self.outcomes}",
        ]
        for name, phase in (("before onset", self.before), ("after onset", self.after)):
            out.append(
                f"{name}: {phase.requests:,} requests, CTR {phase.ctr:.4f} (expected "
                f"{phase.expected_ctr:.4f}; {phase.unchanged_ctr:.4f} in the unchanged world), "
                f"order rate {phase.order_rate:.3f}"
            )
        if self.fault_rows:
            out.append(
                f"feature store: {self.fault_rows:,} rows broken, {self.restored_rows:,} restored"
            )
        out.append(f"{self.simulated_minutes:.1f} simulated minutes in {self.wall_seconds:.1f} s")
        if self.late_seconds:
            out.append(
                f"join with late_seconds >= {self.late_seconds:g} (the longest event delay, "
                "in wall seconds)"
            )
        return out


class _EventQueue:
    """Events waiting for their (wall) time; a task writes the due ones in batches."""

    def __init__(self, outcome_log: OutcomeLog, report: SimulationReport) -> None:
        self._heap: list[tuple[float, int, OutcomeEvent]] = []
        self._seq = itertools.count()
        self._log = outcome_log
        self._report = report
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outcome-writer")

    def put(self, due: float, event: OutcomeEvent) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), event))

    async def run(self, clock: Callable[[], float], done: asyncio.Event) -> None:
        """Write due events until ``done`` is set and nothing waits."""
        loop = asyncio.get_running_loop()
        while not (done.is_set() and not self._heap):
            now = clock()
            due: list[OutcomeEvent] = []
            while self._heap and self._heap[0][0] <= now:
                due.append(heapq.heappop(self._heap)[2])
            if due:
                try:
                    await loop.run_in_executor(self._thread, self._log.write, due)
                except Exception:
                    log.exception("simulate: writing %d outcome events failed", len(due))
                    self._report.write_errors += len(due)
                else:
                    self._report.events.update(e.event for e in due)
            wait = WRITE_INTERVAL_SECONDS
            if self._heap:
                wait = min(wait, max(0.0, self._heap[0][0] - clock()))
            await asyncio.sleep(wait)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self._log.close)
        self._thread.shutdown(wait=True)


class Simulation:
    """One run (see the module doc). ``await Simulation(...).run()`` returns the report."""

    def __init__(
        self,
        settings: SimulateSettings,
        world: SimulatedWorld,
        *,
        say: Callable[[str], None] = lambda _msg: None,
        scenario: Scenario | None = None,
    ) -> None:
        """``scenario``: one with other parameters than the defaults (e.g.
        ``BrokenFeature(mode="constant", value=0.0)``); default: ``settings.scenario``'s."""
        settings.check()
        self.settings = settings
        self.world = world
        self._say = say
        if scenario is None:
            scenario = make_scenario(settings.scenario)
        self.shift: Shift = scenario.shift(
            world.truth, world.log, np.random.default_rng([settings.seed, 1])
        )
        self.plan: TrafficPlan = plan_traffic(
            world.truth,
            np.random.default_rng([settings.seed, 0]),
            users=settings.users,
            seconds=settings.minutes * 60.0 / settings.speed,
            rate=settings.rate,
            speed=settings.speed,
            start_hour=settings.start_hour,
            max_requests=settings.max_requests,
        )
        self.report = SimulationReport(scenario.name, self.shift.summary)
        self.report.late_seconds = longest_tail_seconds(settings.speed)
        self.report.sessions_planned = self.plan.sessions
        self._run_id = uuid.uuid4().hex[:12]
        self._t0 = 0.0
        self._epoch0 = 0.0

    # -- clocks --------------------------------------------------------------------------

    def _now(self) -> float:
        return time.monotonic() - self._t0

    def _simulated(self, wall: float) -> float:
        return wall * self.settings.speed

    @property
    def onset_wall(self) -> float:
        return self.settings.onset_minutes * 60.0 / self.settings.speed

    @property
    def onset_epoch(self) -> float:
        """Unix time of the onset (once :meth:`run` has started): records and events with a
        ``ts`` from here on belong to the changed world."""
        return self._epoch0 + self.onset_wall

    # -- the run -------------------------------------------------------------------------

    async def run(self) -> SimulationReport:
        settings = self.settings
        fault = None
        if self.shift.fault is not None:
            if not settings.feature_store:
                raise SimulationError(
                    "--feature-store: broken-feature needs the online feature store the server "
                    "reads (redis://HOST:PORT/DB)"
                )
            fault = OnlineFeatureFault(
                settings.feature_store,
                settings.control_prefix,
                self.world.features_version,
                self.world.user_ids,
                self.world.row_width,
                self.shift.fault,
            )
            await asyncio.to_thread(fault.check)
        if settings.outcome_sink:
            writer = open_outcome_writer(
                redis_url=settings.outcome_sink,
                stream=settings.outcome_stream,
                auth=settings.redis_auth,
            )
            self.report.outcomes = f"{settings.outcome_sink} stream {settings.outcome_stream}"
        else:
            directory = settings.outcomes or default_outcome_dir(settings.artifacts)
            writer = open_outcome_writer(directory=directory)
            self.report.outcomes = str(directory)
        events = _EventQueue(OutcomeLog(writer), self.report)
        done = asyncio.Event()
        self._t0 = time.monotonic()
        self._epoch0 = time.time()
        writing = asyncio.create_task(events.run(self._now, done), name="outcome-writer")
        onset = asyncio.create_task(self._onset(fault), name="onset")
        try:
            async with grpc.aio.insecure_channel(settings.target) as channel:
                stub: recommender_pb2_grpc.RecommenderAsyncStub = (
                    recommender_pb2_grpc.RecommenderStub(channel)
                )
                await self._drive(stub, events)
        finally:
            onset.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await onset
            done.set()
            try:
                await writing
            finally:
                await events.close()
                if fault is not None:
                    self.report.restored_rows = await asyncio.to_thread(fault.restore)
                    fault.close()
        self.report.wall_seconds = self._now()
        self.report.simulated_minutes = self._simulated(min(self._now(), self._duration)) / 60
        return self.report

    @property
    def _duration(self) -> float:
        return self.settings.minutes * 60.0 / self.settings.speed

    async def _onset(self, fault: OnlineFeatureFault | None) -> None:
        await asyncio.sleep(max(0.0, self.onset_wall - self._now()))
        self._say(f"onset: {self.shift.summary}")
        if fault is not None:
            self.report.fault_rows = await asyncio.to_thread(fault.inject)

    async def _drive(
        self, stub: recommender_pb2_grpc.RecommenderAsyncStub, events: _EventQueue
    ) -> None:
        gate = asyncio.Semaphore(self.settings.concurrency)
        tasks: set[asyncio.Task[None]] = set()
        try:
            for session in range(self.plan.sessions):
                await asyncio.sleep(max(0.0, float(self.plan.start[session]) - self._now()))
                if self._now() >= self._duration:
                    break
                await gate.acquire()
                task = asyncio.create_task(self._session(stub, events, session))
                task.add_done_callback(lambda _t: gate.release())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                self.report.sessions += 1
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            # Cancelled (the caller stops the run) or failed: the sessions still in flight end
            # here, before the channel they call on is closed under them.
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _session(
        self, stub: recommender_pb2_grpc.RecommenderAsyncStub, events: _EventQueue, session: int
    ) -> None:
        plan, settings = self.plan, self.settings
        user = int(plan.user[session])
        lat, lon = float(plan.lat[session]), float(plan.lon[session])
        location = (
            recommender_pb2.Location(lat=lat, lon=lon) if plan.has_location[session] else None
        )
        if location is None:  # the user is at home; the server does not know where
            lat = float(self.world.truth.users.home_lat[user])
            lon = float(self.world.truth.users.home_lon[user])
        rng = np.random.default_rng([settings.seed, 2, session])
        user_id = str(self.world.truth.users.user_ids[user])
        seen: list[int] = []
        for page in range(int(plan.pages[session])):
            if page:
                gap = float(plan.refresh_gap[session]) / settings.speed
                if self._now() + gap >= self._duration:
                    return
                await asyncio.sleep(gap)
            now = self._now()
            hour = int((settings.start_hour + self._simulated(now) / 3600.0) % 24)
            request_id = f"sim-{self._run_id}-{session:06d}-{page}"
            request = recommender_pb2.RecommendRequest(
                user_id=user_id,
                num_results=settings.num_results,
                location=location,
                surface=SURFACES[int(plan.surface[session])],
                platform=PLATFORMS[int(plan.platform[session])],
                request_id=request_id,
                exclude_sku_ids=seen,
                hour=hour,
            )
            try:
                response = await stub.Recommend(request, timeout=settings.timeout_seconds)
            except grpc.aio.AioRpcError as e:
                self.report.errors[e.code().name] += 1
                return
            self.report.requests += 1
            answered = self._now()
            after = self._simulated(answered) >= settings.onset_minutes * 60.0
            truth = self.shift.truth if after else self.world.truth
            items = np.fromiter((i.sku_id for i in response.items), np.int64, len(response.items))
            items = items[(items >= 0) & (items < truth.catalogue.n_items)]
            shown = Page(user=user, items=items, hour=hour, lat=lat, lon=lon)
            click, order = page_logits(truth, shown)
            reaction = react(rng, click, order, self.world.bias)
            phase = self.report.after if after else self.report.before
            seen_now = reaction.impressed
            phase.expected_clicks += float(
                click_probability(click, self.world.bias)[seen_now].sum()
            )
            if after and truth is not self.world.truth:
                unchanged, _ = page_logits(self.world.truth, shown)
                phase.unchanged_clicks += float(
                    click_probability(unchanged, self.world.bias)[seen_now].sum()
                )
            else:
                phase.unchanged_clicks += float(
                    click_probability(click, self.world.bias)[seen_now].sum()
                )
            self._schedule(
                events, response.request_id or request_id, user_id, items, reaction, answered, phase
            )
            seen.extend(int(s) for s in items[reaction.impressed])
            if reaction.ordered.any():
                return  # the user ordered: the session ends

    def _schedule(
        self,
        events: _EventQueue,
        request_id: str,
        user_id: str,
        items: npt.NDArray[np.int64],
        reaction: Reaction,
        answered: float,
        phase: PhaseCounts,
    ) -> None:
        phase.requests += 1
        phase.items += int(items.shape[0])
        phase.impressions += int(reaction.impressed.sum())
        phase.clicks += int(reaction.clicked.sum())
        phase.orders += int(reaction.ordered.sum())
        speed = self.settings.speed
        kinds: tuple[tuple[EventKind, npt.NDArray[np.bool_], npt.NDArray[np.float64]], ...] = (
            ("impression", reaction.impressed, reaction.impression_at),
            ("click", reaction.clicked, reaction.click_at),
            ("order", reaction.ordered, reaction.order_at),
        )
        for kind, mask, at in kinds:
            for position in np.flatnonzero(mask).tolist():
                due = answered + float(at[position]) / speed
                events.put(
                    due,
                    OutcomeEvent(
                        request_id,
                        user_id,
                        int(items[position]),
                        position,
                        kind,
                        self._epoch0 + due,
                    ),
                )


def longest_tail_seconds(speed: float) -> float:
    """Wall seconds a run may wait after its traffic for the last events."""
    return MAX_DELAY_SECONDS / speed
