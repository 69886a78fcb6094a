"""`recsys simulate` against a real server on the small world, over a real socket."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
from pathlib import Path

import numpy as np
import pytest
import redis

from recsys.cli.main import main
from recsys.outcomes import JoinStats, iter_outcomes, join_outcomes
from recsys.serving.exposure import iter_exposure_lines
from recsys.serving.pipeline import open_pipeline
from recsys.serving.server import RunningServer
from recsys.simulation.simulator import (
    SimulatedWorld,
    Simulation,
    SimulationError,
    check_loopback,
)
from tests.simulation.conftest import quick, serve_settings


async def test_every_response_gets_events_that_join_to_its_exposure_record(
    server: RunningServer, simulated_world: SimulatedWorld, tmp_path: Path
) -> None:
    outcomes = tmp_path / "outcomes"
    settings = quick(f"127.0.0.1:{server.port}", outcomes, scenario="none")
    report = await Simulation(settings, simulated_world).run()
    assert report.requests > 10
    assert sum(report.errors.values()) == 0
    assert report.events["impression"] >= 3 * report.requests  # the first slots are always seen
    assert report.events["click"] > 0

    await server.stop()  # flushes the exposure log
    stats = JoinStats()
    records = (r for _p, _n, r in iter_exposure_lines(tmp_path / "exposures"))
    joined = list(join_outcomes(records, iter_outcomes(outcomes), late_seconds=60, stats=stats))
    assert stats.requests == report.requests
    assert stats.joined == sum(report.events.values())
    assert (stats.orphans, stats.unserved, stats.duplicates, stats.late_dropped) == (0, 0, 0, 0)
    clicks = sum(int(j.clicked.sum()) for j in joined)
    assert clicks == report.events["click"]
    for j in joined:
        assert not (j.clicked & ~j.impressed).any()
        assert not (j.ordered & ~j.clicked).any()
    hours = {j.hour for j in joined}
    assert hours <= {12, 13}  # the request's hour: ten simulated minutes from 12:00

    # Each event is written when its (compressed) time comes: a click after its impression, an
    # order after its click, every one after the response's exposure record.
    served_at = {j.request_id: j.ts for j in joined}
    when: dict[tuple[str, int, str], float] = {}
    for event in iter_outcomes(outcomes):
        assert event.ts >= served_at[event.request_id]
        when[(event.request_id, event.position, event.event)] = event.ts
    for (request_id, position, kind), ts in when.items():
        if kind == "click":
            assert ts > when[(request_id, position, "impression")]
        if kind == "order":
            assert ts > when[(request_id, position, "click")]


async def test_the_run_is_bounded_by_max_requests(
    server: RunningServer, simulated_world: SimulatedWorld, tmp_path: Path
) -> None:
    settings = quick(f"127.0.0.1:{server.port}", tmp_path / "o", max_requests=5)
    simulation = Simulation(settings, simulated_world)
    assert simulation.plan.requests <= 5
    report = await simulation.run()
    assert 0 < report.requests <= 5


async def test_a_cancelled_run_ends_its_sessions_before_closing_the_channel(
    server: RunningServer, simulated_world: SimulatedWorld, tmp_path: Path
) -> None:
    """`recsys loop` cancels the simulation when the canary is decided: sessions in flight were
    left calling on the closed channel ("Channel is closed", task exceptions never retrieved)."""
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    try:
        settings = quick(f"127.0.0.1:{server.port}", tmp_path / "o", minutes=60.0, speed=60.0)
        simulation = Simulation(settings, simulated_world)
        run = asyncio.create_task(simulation.run())
        while simulation.report.requests < 20:  # sessions are in flight
            assert not run.done()
            await asyncio.sleep(0.05)
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
        for _ in range(3):  # let any orphaned task fail and be collected
            await asyncio.sleep(0.2)
            gc.collect()
        assert unhandled == []
    finally:
        loop.set_exception_handler(previous)


@pytest.mark.parametrize("scenario", ["taste-shift", "price-inflation", "new-restaurants"])
async def test_each_world_scenario_lowers_the_served_models_click_rate(
    scenario: str, server: RunningServer, simulated_world: SimulatedWorld, tmp_path: Path
) -> None:
    """Noise-free: the click probability of every impression after the onset, in the changed
    world against the same impressions in the unchanged one."""
    settings = quick(f"127.0.0.1:{server.port}", tmp_path / "o", scenario=scenario)
    report = await Simulation(settings, simulated_world).run()
    after = report.after
    assert after.impressions > 100
    assert after.expected_ctr < 0.97 * after.unchanged_ctr, report.lines()


def test_the_same_seed_plans_the_same_traffic_and_the_same_change(
    simulated_world: SimulatedWorld,
) -> None:
    def plan(seed: int, scenario: str) -> Simulation:
        return Simulation(
            quick("127.0.0.1:1", Path("unused"), seed=seed, scenario=scenario), simulated_world
        )

    for scenario in ("taste-shift", "price-inflation", "new-restaurants"):
        a, b = plan(3, scenario), plan(3, scenario)
        assert np.array_equal(a.plan.user, b.plan.user)
        assert np.array_equal(a.plan.start, b.plan.start)
        assert a.shift.summary == b.shift.summary
        assert np.array_equal(a.shift.truth.tastes.taste, b.shift.truth.tastes.taste)
        assert np.array_equal(
            a.shift.truth.catalogue.item_price, b.shift.truth.catalogue.item_price
        )
    # Another seed: other sessions, another trend (which users move, towards what).
    a, other = plan(3, "taste-shift"), plan(4, "taste-shift")
    assert not np.array_equal(a.plan.user, other.plan.user)
    assert not np.array_equal(a.shift.truth.tastes.taste, other.shift.truth.tastes.taste)


@pytest.mark.parametrize(
    "target", ["10.0.0.1:50051", "example.com:50051", "0.0.0.0:50051", "127.0.0.1", "[::1]:x"]
)
def test_only_loopback_targets_are_accepted(target: str) -> None:
    with pytest.raises(SimulationError, match="--target"):
        check_loopback(target)


def test_loopback_targets_pass() -> None:
    assert check_loopback("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert check_loopback("[::1]:9") == ("::1", 9)
    assert check_loopback("localhost:1") == ("localhost", 1)


def test_the_cli_refuses_a_remote_target_and_an_unknown_scenario_in_one_line(
    artifacts_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["simulate", "--artifacts", str(artifacts_dir), "--minutes", "1"]
    assert main([*common, "--target", "192.168.1.5:50051"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--target" in err
    assert main([*common, "--target", "127.0.0.1:1", "--scenario", "meteor"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "none, taste-shift, price-inflation, broken-feature, new-restaurants" in err


async def test_events_go_to_a_redis_stream(
    server: RunningServer,
    simulated_world: SimulatedWorld,
    tmp_path: Path,
    redis_url: str,
    redis_prefix: str,
) -> None:
    stream = f"{redis_prefix}outcomes"
    settings = quick(
        f"127.0.0.1:{server.port}",
        tmp_path / "unused",
        outcome_sink=redis_url,
        outcome_stream=stream,
        max_requests=20,
    )
    report = await Simulation(settings, simulated_world).run()
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.xlen(stream) == sum(report.events.values()) > 0
    finally:
        client.close()
    assert not (tmp_path / "unused").exists()
    assert math.isfinite(report.before.ctr)


async def test_broken_feature_breaks_one_online_column_for_the_server_and_restores_it(
    artifacts: Path,
    simulated_world: SimulatedWorld,
    tmp_path: Path,
    redis_url: str,
    redis_prefix: str,
) -> None:
    publish = ["features", "publish", "--artifacts", str(artifacts)]
    assert main([*publish, "--feature-store", redis_url, "--control-prefix", redis_prefix]) == 0
    client = redis.Redis.from_url(redis_url)
    keys = sorted(client.scan_iter(match=f"{redis_prefix}*:uv:*", count=1000))
    published = client.mget(keys)
    exposures = tmp_path / "exposures"
    running = await RunningServer.start(
        serve_settings(artifacts, exposures, feature_store=redis_url, control_prefix=redis_prefix),
        open_pipeline,
    )
    try:
        await running.wait_ready()
        settings = quick(
            f"127.0.0.1:{running.port}",
            tmp_path / "outcomes",
            scenario="broken-feature",
            onset_minutes=5.0,
            feature_store=redis_url,
            control_prefix=redis_prefix,
        )
        report = await Simulation(settings, simulated_world).run()
    finally:
        await running.stop()
    try:
        assert client.mget(keys) == published  # restored, byte for byte
    finally:
        client.close()
    assert report.fault_rows == len(keys) == report.restored_rows
    column = simulated_world.row_width - 4  # user_price_mean
    values = [
        record["user_features"][column]
        for _p, _n, record in iter_exposure_lines(exposures)
        if record["user_features"] is not None
    ]
    broken = [v is None for v in values]  # NaN is written as null
    assert any(broken)  # after the onset
    assert not all(broken)  # before it
    assert broken.index(True) > 0
