"""The native load generator (benchmarks/loadgen/loadgen.cc), built with g++ and run against
real gRPC servers: it sends every call, reads every status, and its output is the same summary
as the Python generator's."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest

from benchmarks.load_generator import (
    CHANNELS,
    build_native,
    generate_native,
    run_native,
    write_requests,
)
from recsys.v1 import recommender_pb2, recommender_pb2_grpc


@pytest.fixture(scope="module")
def binary() -> str:
    if shutil.which("g++") is None or shutil.which("pkg-config") is None:
        pytest.skip("g++ and pkg-config are needed to build the native generator")
    if subprocess.run(["pkg-config", "--exists", "grpc++"]).returncode != 0:
        pytest.skip("gRPC's C++ library (libgrpc++-dev) is needed to build the native generator")
    return str(build_native())


class Answers(recommender_pb2_grpc.RecommenderServicer):
    """Answers by the request's user id: ``shed-*`` RESOURCE_EXHAUSTED, ``bad-*``
    INVALID_ARGUMENT, anything else a feed; remembers the user ids and the peers it saw."""

    def __init__(self) -> None:
        self.users: list[str] = []
        self.peers: set[str] = set()

    async def Recommend(
        self, request: recommender_pb2.RecommendRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> recommender_pb2.RecommendResponse:
        self.users.append(request.user_id)
        self.peers.add(context.peer())
        if request.user_id.startswith("shed-"):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        if request.user_id.startswith("bad-"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "user_id: expected a user")
        return recommender_pb2.RecommendResponse(request_id=request.request_id)


async def run(answers: Answers, users: list[str], **load: float) -> dict[str, Any]:
    """``generate_native`` (in a thread: it waits for a subprocess) against ``answers`` served
    on a real port; returns its summary with the raw tally's latency lists."""
    server = grpc.aio.server()
    recommender_pb2_grpc.add_RecommenderServicer_to_server(answers, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    args = argparse.Namespace(
        target=f"127.0.0.1:{port}", seconds=load.get("seconds", 1.0),
        rate=load.get("rate", 0.0), clients=int(load.get("clients", 0)),
    )  # fmt: skip
    requests = [recommender_pb2.RecommendRequest(user_id=u, num_results=5) for u in users]
    try:
        tally = await asyncio.to_thread(generate_native, args, requests)
    finally:
        await server.stop(None)
    summary = tally.summary(args.seconds)
    summary["tally"] = tally
    return summary


async def test_the_open_loop_sends_every_call_in_turn_and_counts_each_status(binary: str) -> None:
    answers = Answers()
    users = ["u-0", "shed-1", "u-2", "bad-3"]
    summary = await run(answers, users, rate=200, seconds=1.0)
    assert summary["calls"] == 200
    assert summary["codes"] == {"OK": 100, "RESOURCE_EXHAUSTED": 50, "INVALID_ARGUMENT": 50}
    assert summary["details"] == {
        "RESOURCE_EXHAUSTED": "queue full",
        "INVALID_ARGUMENT": "user_id: expected a user",
    }
    tally = summary["tally"]
    assert len(tally.answered) == 100
    assert len(tally.shed) == 50
    assert len(tally.failed) == 50
    assert len(tally.send_lag) == 200
    assert all(latency > 0 for latency in tally.answered + tally.shed + tally.failed)
    assert sorted(answers.users) == sorted(users * 50)  # the request file, sent as written
    assert summary["shed_share"] == 0.25


async def test_the_closed_loop_keeps_its_callers_busy_on_a_connection_per_channel(
    binary: str,
) -> None:
    answers = Answers()
    summary = await run(answers, ["u-0", "u-1"], clients=CHANNELS * 2, seconds=0.5)
    assert summary["codes"] == {"OK": summary["calls"]}
    assert summary["calls"] > CHANNELS * 2  # each caller sent again after its answer
    assert summary["send_lag_p99_ms"] is None  # no schedule in a closed loop
    assert len(answers.peers) == CHANNELS


async def test_first_starts_the_calls_further_along_the_request_file(
    binary: str, tmp_path: Path
) -> None:
    answers = Answers()
    server = grpc.aio.server()
    recommender_pb2_grpc.add_RecommenderServicer_to_server(answers, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    users = ["u-0", "u-1", "u-2", "u-3"]
    path = tmp_path / "requests.bin"
    write_requests(path, [recommender_pb2.RecommendRequest(user_id=u) for u in users])
    try:
        tally = await asyncio.to_thread(
            run_native, f"127.0.0.1:{port}", path, 0.5, rate=10, first=2
        )
    finally:
        await server.stop(None)
    assert tally.codes == {"OK": 5}
    # calls 0-4 send requests 2, 3, 0, 1, 2: the file read from the third, wrapping at its end
    assert sorted(answers.users) == ["u-0", "u-1", "u-2", "u-2", "u-3"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--rate", "0"], "--rate 0: expected a number > 0"),
        (["--rate", "5", "--clients", "2"], "expected one of --rate or --clients"),
        (["--clients", "2", "--requests", "/nonexistent/requests"], "cannot read it"),
        (["--clients", "2", "--first", "-1"], "--first -1: expected a whole number >= 0"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(binary: str, flags: list[str], message: str) -> None:
    cmd = [binary, "--target", "127.0.0.1:1", "--requests", "/dev/null", *flags]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2
    first = out.stderr.splitlines()[0]
    assert first.startswith("loadgen: ")
    assert message in first
