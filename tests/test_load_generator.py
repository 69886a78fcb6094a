"""The native load generator (benchmarks/loadgen/loadgen.cc), built with g++ and run against
real gRPC servers: it sends every call, reads every status, and its output is the same summary
as the Python generator's."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from benchmarks.load_generator import (
    CHANNELS,
    build_native,
    generate_native,
    run_native,
    timeline,
    write_requests,
)
from recsys.serving.routing import USER_HEADER, user_header_value
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
    INVALID_ARGUMENT, ``stall-*`` a feed after blocking the event loop for 0.3 s (every call
    waits behind it, as behind a stalled server), anything else a feed; remembers the user
    ids, the user headers (None: no header) and the peers it saw."""

    def __init__(self) -> None:
        self.users: list[str] = []
        self.headers: list[str | None] = []
        self.peers: set[str] = set()

    async def Recommend(
        self, request: recommender_pb2.RecommendRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> recommender_pb2.RecommendResponse:
        self.users.append(request.user_id)
        self.headers.append(dict(context.invocation_metadata() or ()).get(USER_HEADER))
        self.peers.add(context.peer())
        if request.user_id.startswith("shed-"):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        if request.user_id.startswith("bad-"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "user_id: expected a user")
        if request.user_id.startswith("stall-"):
            time.sleep(0.3)  # noqa: ASYNC251 - the stall under test: the whole loop stops
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
    assert answers.headers == answers.users  # each call names its user for the balancers
    assert summary["shed_share"] == 0.25


async def test_the_timeline_finds_a_stall_of_the_server_where_it_happened(binary: str) -> None:
    """200 calls over a second; the server's loop stops for 0.3 s at the call due at 0.5 s."""
    users = [f"u-{n}" for n in range(200)]
    users[100] = "stall-100"
    summary = await run(Answers(), users, rate=200, seconds=1.0)
    tally = summary["tally"]
    assert len(tally.answered_at) == len(tally.answered) == 200
    assert tally.not_ok_at == []
    assert sorted(tally.answered_at) == pytest.approx([n / 200 for n in range(200)])
    line = summary["timeline"]
    assert line["windows"] == 4
    slowest = line["slowest_window"]
    assert slowest["at_s"] == 0.5  # the window the stall began in
    assert slowest["p50_ms"] > 100
    assert slowest["max_ms"] >= 290
    assert line["stalled_windows"] >= 1


def test_timeline_by_hand() -> None:
    """2 s of calls at 10 ms, but 200 ms (and three refusals) for the ones due in 1.0-1.5 s."""
    at = [n / 100 for n in range(200)]
    answered = [0.2 if 1.0 <= t < 1.5 else 0.01 for t in at]
    line = timeline(answered, at, [1.1, 1.3, 1.4])
    assert line == {
        "slowest_window": {"at_s": 1.0, "p50_ms": 200.0, "max_ms": 200.0, "not_ok": 1},
        "stalled_windows": 2,
        "windows": 8,
    }
    assert timeline([], [], []) is None
    assert timeline([0.01, 0.02], [], []) is None  # no due times (a closed loop in Python)


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
    assert answers.headers == answers.users


async def test_the_user_header_is_read_off_the_request_bytes_and_left_out_on_request(
    binary: str, tmp_path: Path
) -> None:
    # user_id written after fields of each wire type the request has (varints, strings, a
    # nested message, packed ids): the generator skips them as protobuf's parser does.
    others = recommender_pb2.RecommendRequest(
        num_results=7, request_id="r-1", surface="home", exclude_sku_ids=[1, 2, 300], hour=12
    )
    others.location.lat, others.location.lon = 52.5, 13.4
    last = recommender_pb2.RecommendRequest(user_id="user-0000042").SerializeToString()
    bodies = [
        others.SerializeToString() + last,
        recommender_pb2.RecommendRequest().SerializeToString(),
        recommender_pb2.RecommendRequest(user_id="ü ser/1").SerializeToString(),
    ]
    parsed = recommender_pb2.RecommendRequest.FromString(bodies[0])
    assert (parsed.user_id, parsed.hour, list(parsed.exclude_sku_ids)) == (
        "user-0000042",
        12,
        [1, 2, 300],
    )
    path = tmp_path / "requests.bin"
    path.write_bytes(b"".join(struct.pack(">I", len(b)) + b for b in bodies))
    answers = Answers()
    server = grpc.aio.server()
    recommender_pb2_grpc.add_RecommenderServicer_to_server(answers, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    target = f"127.0.0.1:{port}"
    try:
        named = await asyncio.to_thread(run_native, target, path, 0.5, rate=6)
        unnamed = await asyncio.to_thread(run_native, target, path, 0.5, rate=4, user_header="")
    finally:
        await server.stop(None)
    assert named.codes == {"OK": 3}
    assert unnamed.codes == {"OK": 2}
    assert answers.users == ["user-0000042", "", "ü ser/1", "user-0000042", ""]
    # a request without a user id gets no header; one with characters a header cannot carry
    # gets the value the Python clients send; with user_header="" no call gets one
    encoded = user_header_value("ü ser/1")
    assert encoded == "%C3%BC%20ser%2F1"
    assert answers.headers == ["user-0000042", None, encoded, None, None]


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
