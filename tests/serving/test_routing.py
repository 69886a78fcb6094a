"""Calls routed by user (recsys/serving/routing.py): through a real HAProxy front and through
gRPC's ring_hash policy in a client channel, every call of one user reaches one server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from recsys.serving.client import recommend
from recsys.serving.front import Backend, FrontSettings, haproxy_config, start_front
from recsys.serving.routing import USER_HEADER, routed_channel_options, user_metadata
from recsys.serving.workers import free_port
from recsys.v1 import recommender_pb2, recommender_pb2_grpc
from tests.serving.test_front import needs_haproxy

USERS = [f"user-{n:07d}" for n in range(25)]
"""An odd number: calls sent in turn and balanced in turn over two backends then move each user
from one backend to the other (with an even number each user would keep its backend)."""


class Recorder(recommender_pb2_grpc.RecommenderServicer):
    """Answers every call with an empty feed; remembers the users it served. A call whose
    request id starts with ``hold`` is answered only once ``gate`` is set; ``arrivals``, when
    given, gets each call's request id as it arrives."""

    def __init__(self) -> None:
        self.users: list[str] = []
        self.headers: list[str | None] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.arrivals: asyncio.Queue[str] | None = None

    async def Recommend(
        self, request: recommender_pb2.RecommendRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> recommender_pb2.RecommendResponse:
        self.users.append(request.user_id)
        self.headers.append(dict(context.invocation_metadata() or ()).get(USER_HEADER))
        if self.arrivals is not None:
            self.arrivals.put_nowait(request.request_id)
        if request.request_id.startswith("hold"):
            await self.gate.wait()
        return recommender_pb2.RecommendResponse(request_id=request.request_id)


@asynccontextmanager
async def recorders(n: int) -> AsyncIterator[list[tuple[int, Recorder]]]:
    """``n`` gRPC servers on their own ports, each with its :class:`Recorder`."""
    running: list[tuple[grpc.aio.Server, int, Recorder]] = []
    try:
        for _ in range(n):
            recorder = Recorder()
            server = grpc.aio.server()
            recommender_pb2_grpc.add_RecommenderServicer_to_server(recorder, server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            running.append((server, port, recorder))
        yield [(port, recorder) for _, port, recorder in running]
    finally:
        for server, _, _ in running:
            await server.stop(None)


@asynccontextmanager
async def behind_a_front(
    tmp_path: Path, in_flight: int, queue_ms: int, balance: str = "user"
) -> AsyncIterator[tuple[str, list[Recorder]]]:
    """Two :class:`Recorder` servers behind a real front; yields its target and the recorders
    (their readiness calls forgotten)."""
    async with recorders(2) as running:
        settings = FrontSettings(
            "127.0.0.1",
            free_port("127.0.0.1"),
            tuple(Backend("127.0.0.1", port) for port, _ in running),
            max_in_flight=in_flight,
            max_queue_ms=queue_ms,
            balance=balance,
        )
        process = start_front(settings, tmp_path)
        try:
            target = f"127.0.0.1:{settings.listen_port}"
            await answering(target)
            served = [recorder for _, recorder in running]
            for recorder in served:
                recorder.users.clear()
            yield target, served
        finally:
            process.terminate()
            await asyncio.to_thread(process.wait, 30)


async def send(
    channel: grpc.aio.Channel, users: Sequence[str], repeats: int, *, header: bool = True
) -> None:
    """``repeats`` calls for each user, one at a time, with or without the user header."""
    stub = recommender_pb2_grpc.RecommenderStub(channel)
    for _ in range(repeats):
        for user in users:
            request = recommender_pb2.RecommendRequest(user_id=user)
            await stub.Recommend(
                request, timeout=10, metadata=user_metadata(user) if header else None
            )


async def answering(target: str) -> None:
    """Wait (at most 10 s) until a call through ``target`` is answered."""
    async with asyncio.timeout(10), grpc.aio.insecure_channel(target) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        while True:
            try:
                await stub.Recommend(recommender_pb2.RecommendRequest(user_id="ready"), timeout=1)
                return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)


def servers_by_user(served: Sequence[Recorder]) -> dict[str, set[int]]:
    where: dict[str, set[int]] = {}
    for n, recorder in enumerate(served):
        for user in recorder.users:
            where.setdefault(user, set()).add(n)
    return where


def test_the_front_sends_a_user_to_the_hashed_worker_while_it_has_a_free_slot() -> None:
    two = (Backend("127.0.0.1", 7001), Backend("127.0.0.1", 7002))
    by_user = haproxy_config(FrontSettings("127.0.0.1", 50051, two, 4, 5))
    block = by_user[by_user.index("backend recsys") :]
    assert "    balance leastconn\n" in block  # without the header, or with its worker full
    assert f"    http-request set-var(txn.worker) req.hdr({USER_HEADER}),crc32,mod(2)\n" in block
    for n in (0, 1):
        free = f"{{ srv_conn(recsys/w{n}) lt 4 }}"  # fewer than max_in_flight in flight
        assert f"    use-server w{n} if {{ var(txn.worker) -m int {n} }} {free}\n" in block
    least = haproxy_config(FrontSettings("127.0.0.1", 50051, two, 4, 5, balance="leastconn"))
    assert "    balance leastconn\n" in least
    assert USER_HEADER not in least
    assert "use-server" not in least


@needs_haproxy
@pytest.mark.parametrize("balance", ["user", "leastconn"])
async def test_through_the_front_each_user_reaches_one_backend_when_balanced_by_user(
    tmp_path: Path, balance: str
) -> None:
    async with (
        behind_a_front(tmp_path, 4, 1000, balance) as (target, served),
        grpc.aio.insecure_channel(target) as channel,
    ):
        await send(channel, USERS, repeats=4)
        by_user = servers_by_user(served)
        for recorder in served:
            recorder.users.clear()
        await send(channel, ["user-anonymous"], repeats=8, header=False)
        without_header = servers_by_user(served)
    assert set(by_user) == set(USERS)
    spread = sum(len(backends) > 1 for backends in by_user.values())
    if balance == "user":
        assert spread == 0  # every call of a user on the backend its hash names
        assert {n for backends in by_user.values() for n in backends} == {0, 1}  # both used
    else:
        assert spread > 0  # least connections (round-robin among equals): users spread
    assert without_header["user-anonymous"] == {0, 1}  # no header: round-robin


@needs_haproxy
async def test_a_user_whose_worker_is_full_is_served_by_the_other_worker_not_refused(
    tmp_path: Path,
) -> None:
    user = USERS[0]
    async with (
        behind_a_front(tmp_path, 2, 200) as (target, served),
        grpc.aio.insecure_channel(target) as channel,
    ):
        stub = recommender_pb2_grpc.RecommenderStub(channel)

        def call(request_id: str) -> Any:
            request = recommender_pb2.RecommendRequest(user_id=user, request_id=request_id)
            return stub.Recommend(request, timeout=10, metadata=user_metadata(user))

        arrivals: asyncio.Queue[str] = asyncio.Queue()
        for recorder in served:
            recorder.gate.clear()
            recorder.arrivals = arrivals
        held = [asyncio.ensure_future(call(f"hold-{n}")) for n in range(2)]
        async with asyncio.timeout(10):  # both arrive, held by the user's worker
            await arrivals.get()
            await arrivals.get()
        assert sorted(len(r.users) for r in served) == [0, 2]  # that worker is full
        full = next(n for n, r in enumerate(served) if len(r.users) == 2)
        # A third call of the user: the other worker answers it at once, instead of the call
        # waiting for a slot of the full one (and being refused after 200 ms).
        reply = await call("third")
        assert reply.request_id == "third"
        assert served[1 - full].users == [user]
        for recorder in served:
            recorder.gate.set()
        assert [r.request_id for r in await asyncio.gather(*held)] == ["hold-0", "hold-1"]


async def test_the_recommend_client_names_the_user_in_the_header() -> None:
    async with recorders(1) as [(port, recorder)]:
        for user in ("user-0000007", "ü ser\n"):  # any text a user id may be
            request = recommender_pb2.RecommendRequest(user_id=user)
            await asyncio.to_thread(recommend, f"127.0.0.1:{port}", request)
    assert recorder.users == ["user-0000007", "ü ser\n"]
    # printable ASCII in the header (gRPC refuses a call with other bytes in one)
    assert recorder.headers == ["user-0000007", "%C3%BC%20ser%0A"]


async def test_a_routed_channel_sends_each_user_to_one_address_of_the_target() -> None:
    async with recorders(3) as running:
        target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port, _ in running)
        served = [recorder for _, recorder in running]
        async with grpc.aio.insecure_channel(target, options=routed_channel_options()) as routed:
            await send(routed, USERS, repeats=3)
            by_user = servers_by_user(served)
            for recorder in served:
                recorder.users.clear()
            # Without the header (a retry of a refused call): a random hash per call, so any
            # address (all 12 calls on one of the 3 by chance: p = 3 / 3**12).
            await send(routed, USERS[:1], repeats=12, header=False)
            assert len(servers_by_user(served)[USERS[0]]) >= 2
        assert set(by_user) == set(USERS)
        assert all(len(servers) == 1 for servers in by_user.values())
        assert len({n for servers in by_user.values() for n in servers}) >= 2  # users spread
        for recorder in served:
            recorder.users.clear()
        async with grpc.aio.insecure_channel(
            target, options=[("grpc.lb_policy_name", "round_robin")]
        ) as plain:
            await send(plain, USERS[:1], repeats=6)
        assert len(servers_by_user(served)[USERS[0]]) == 3  # round-robin: everywhere
