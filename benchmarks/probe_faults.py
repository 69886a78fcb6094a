"""The fault probe, rerun: a real `recsys serve` attacked the ways the security review did.

Starts a redis-server of its own on a free port (the control plane; it is stopped and started
again mid-run) and `recsys serve` on a copy of ``--artifacts``, then, in order:

1. **fuzz**: ``--fuzz`` requests with random field values (unicode, huge, negative, NaN and
   infinite coordinates, long exclusion lists): counts per status code; INTERNAL must be 0.
2. **malformed**: ``--malformed`` random byte strings sent as Recommend: all INVALID_ARGUMENT.
3. **redis outage**: clients keep calling while Redis is killed for ``--outage-seconds`` and
   started again: failed calls must be 0.
4. **corrupt model**: a copy of the served model version with one byte changed in model.txt
   is routed to production: it must be refused (no failed call, the old version serves).
5. **concurrent writers**: two writers do ``--writes`` read-modify-write cycles each on the
   experiments document with expected versions: every write either lands or is a conflict,
   and the final version counts exactly the landed ones (no lost update).
6. **SIGTERM under load**: six clients keep calling while the server gets SIGTERM, each until
   its first UNAVAILABLE (then it goes elsewhere, as behind a load balancer): no call may end
   CANCELLED, exit code 0.

Overload figures come from ``python -m benchmarks.bench_overload``. Prints one JSON object.

    python -m benchmarks.probe_faults --artifacts /tmp/art [--fuzz 5000] [--malformed 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import redis

from benchmarks.bench_latency import free_port, make_requests, wait_serving_for
from recsys.control.backends import open_store
from recsys.control.redis_store import RedisStore
from recsys.control.store import EXPERIMENTS, ROUTING, VersionConflict
from recsys.v1 import recommender_pb2, recommender_pb2_grpc

PREFIX = "recsys:"
RECOMMEND = "/recsys.v1.Recommender/Recommend"


def loadavg() -> list[str]:
    with open("/proc/loadavg") as f:
        return f.read().split()[:3]


class OwnRedis:
    """A redis-server on a free port that the probe kills and starts again."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes", "--dir", str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


def fuzzed_request(rng: random.Random) -> recommender_pb2.RecommendRequest:
    def text() -> str:
        kind = rng.randrange(5)
        if kind == 0:
            return ""
        if kind == 1:
            return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(1, 40)))
        if kind == 2:
            return "u" * rng.choice([1, 64, 65, 256, 10_000])
        if kind == 3:
            return f"user-{rng.randrange(10_000):07d}"
        return rng.choice(["../../etc/passwd", "user\x00", "'; DROP", "home", "search"])

    def coordinate() -> float:
        return rng.choice(
            [math.nan, math.inf, -math.inf, 0.0, rng.uniform(-1000, 1000), rng.uniform(-90, 90)]
        )

    request = recommender_pb2.RecommendRequest(
        user_id=text(),
        num_results=rng.choice([0, 1, 20, 200, 201, 2**31 - 1, rng.randrange(-(2**31), 0)]),
        surface=text(),
        platform=text(),
        request_id=text(),
        exclude_sku_ids=[rng.randrange(-(2**63), 2**63) for _ in range(rng.randrange(0, 50))],
    )
    if rng.random() < 0.5:
        request.location.lat = coordinate()
        request.location.lon = coordinate()
    return request


async def codes_of(calls: list[Any]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for result in await asyncio.gather(*calls, return_exceptions=True):
        if isinstance(result, grpc.aio.AioRpcError):
            counts[result.code().name] += 1
        elif isinstance(result, BaseException):
            counts[type(result).__name__] += 1
        else:
            counts["OK"] += 1
    return dict(counts)


async def fuzz(target: str, n: int, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        codes: Counter[str] = Counter()
        for start in range(0, n, 50):  # 50 in flight at a time
            batch = [
                stub.Recommend(fuzzed_request(rng), timeout=10) for _ in range(min(50, n - start))
            ]
            codes.update(await codes_of(batch))
    return {"requests": n, "codes": dict(codes), "internal": codes.get("INTERNAL", 0)}


async def malformed(target: str, n: int, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(  # bytes in, bytes out
            RECOMMEND, request_serializer=None, response_deserializer=None
        )
        payloads = [rng.randbytes(rng.randrange(1, 200)) for _ in range(n)]
        codes = await codes_of([call(p, timeout=10) for p in payloads])
    return {"messages": n, "codes": codes}


class Clients:
    """Closed-loop clients counting status codes and served model versions."""

    def __init__(self, target: str, requests: list[recommender_pb2.RecommendRequest]) -> None:
        self.target = target
        self.requests = requests
        self.codes: Counter[str] = Counter()
        self.models: Counter[str] = Counter()
        self.stop = asyncio.Event()
        self.leaving = asyncio.Event()
        """Set when the server was told to stop: a client seeing UNAVAILABLE then goes
        elsewhere, as a client behind a load balancer does (it sends nothing more here)."""
        self._tasks: list[asyncio.Task[None]] = []

    async def _client(self, n: int) -> None:
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = recommender_pb2_grpc.RecommenderStub(channel)
            while not self.stop.is_set():
                request = self.requests[n % len(self.requests)]
                n += 7
                try:
                    reply = await stub.Recommend(request, timeout=10)
                except grpc.aio.AioRpcError as e:
                    self.codes[e.code().name] += 1
                    if e.code() == grpc.StatusCode.UNAVAILABLE and self.leaving.is_set():
                        return
                else:
                    self.codes["OK"] += 1
                    self.models[reply.model_version] += 1

    def start(self, clients: int) -> None:
        self._tasks = [asyncio.ensure_future(self._client(n)) for n in range(clients)]

    async def finish(self) -> dict[str, int]:
        self.stop.set()
        await asyncio.gather(*self._tasks)
        return dict(self.codes)


async def redis_outage(
    target: str, requests: list[recommender_pb2.RecommendRequest], own: OwnRedis, seconds: float
) -> dict[str, object]:
    clients = Clients(target, requests)
    clients.start(4)
    await asyncio.sleep(2)
    await asyncio.to_thread(own.kill)
    await asyncio.sleep(seconds)
    await asyncio.to_thread(own.start)
    await asyncio.sleep(3)
    codes = await clients.finish()
    return {"outage_s": seconds, "codes": codes, "failed": sum(codes.values()) - codes["OK"]}


def corrupt_copy(root: Path, version: str) -> str:
    source = root / "models" / "ranker" / version
    target = root / "models" / "ranker" / "c0ffee000000"
    shutil.copytree(source, target)
    model = target / "model.txt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    return target.name


async def corrupt_model(
    target: str, requests: list[recommender_pb2.RecommendRequest], store: RedisStore, root: Path
) -> dict[str, object]:
    routing = store.read(ROUTING)
    assert routing is not None
    served = routing.body["models"]["ranker"]["production"]
    bad = corrupt_copy(root, served)
    clients = Clients(target, requests)
    clients.start(4)
    await asyncio.sleep(1)
    body = {**routing.body, "models": {"ranker": {"production": bad, "previous": served}}}
    store.write(ROUTING, body, expected_version=routing.version, author="probe")
    await asyncio.sleep(3)
    codes = await clients.finish()
    restored = store.read(ROUTING)
    assert restored is not None
    store.write(ROUTING, routing.body, expected_version=restored.version, author="probe")
    return {
        "routed_version": bad,
        "codes": codes,
        "served_versions": dict(clients.models),
        "served_the_corrupt_one": clients.models.get(bad, 0),
    }


def concurrent_writers(url: str, writes: int) -> dict[str, object]:
    stores = [RedisStore(url, prefix=PREFIX) for _ in range(2)]
    start = stores[0].read_version(EXPERIMENTS)
    landed = [0, 0]
    conflicts = [0, 0]

    def writer(n: int) -> None:
        for _ in range(writes):
            document = stores[n].read(EXPERIMENTS)
            assert document is not None
            try:
                stores[n].write(
                    EXPERIMENTS, document.body, expected_version=document.version, author=f"w{n}"
                )
                landed[n] += 1
            except VersionConflict:
                conflicts[n] += 1

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = stores[0].read_version(EXPERIMENTS)
    for s in stores:
        s.close()
    return {
        "attempts": 2 * writes,
        "landed": sum(landed),
        "conflicts": sum(conflicts),
        "version_advanced_by": end - start,
        "lost_updates": sum(landed) - (end - start),
    }


async def sigterm_under_load(
    target: str, requests: list[recommender_pb2.RecommendRequest], server: subprocess.Popen[bytes]
) -> dict[str, object]:
    clients = Clients(target, requests)
    clients.start(6)
    await asyncio.sleep(2)
    clients.leaving.set()
    server.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(server.wait, 120)
    codes = await clients.finish()
    return {"codes": codes, "cancelled": codes.get("CANCELLED", 0), "exit_code": code}


async def probe(
    args: argparse.Namespace, root: Path, own: OwnRedis, server: Any
) -> dict[str, object]:
    target = f"127.0.0.1:{args.port}"
    await wait_serving_for(target, 300)
    requests = make_requests(root, 2000, seed=9)
    result: dict[str, object] = {"loadavg_start": loadavg()}
    result["fuzz"] = await fuzz(target, args.fuzz, seed=1)
    result["malformed"] = await malformed(target, args.malformed, seed=2)
    result["redis_outage"] = await redis_outage(target, requests, own, args.outage_seconds)
    store = RedisStore(own.url, prefix=PREFIX)
    try:
        result["corrupt_model"] = await corrupt_model(target, requests, store, root)
    finally:
        store.close()
    result["concurrent_writers"] = await asyncio.to_thread(concurrent_writers, own.url, args.writes)
    result["sigterm_under_load"] = await sigterm_under_load(target, requests, server)
    result["loadavg_end"] = loadavg()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--fuzz", type=int, default=5000)
    parser.add_argument("--malformed", type=int, default=500)
    parser.add_argument("--outage-seconds", type=float, default=3.0)
    parser.add_argument("--writes", type=int, default=50)
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("probe_faults: redis-server is not installed")
    with tempfile.TemporaryDirectory(prefix="probe-faults-") as tmp:
        root = Path(tmp) / "artifacts"
        shutil.copytree(args.artifacts, root, ignore=shutil.ignore_patterns("exposures"))
        own = OwnRedis(Path(tmp))
        own.start()
        seed = open_store("", root)
        control = RedisStore(own.url, prefix=PREFIX)
        for name in (EXPERIMENTS, ROUTING, "availability"):
            document = seed.read(name)
            assert document is not None
            control.write(name, document.body, expected_version=0, author="probe")
        seed.close()
        control.close()
        args.port = free_port()
        cmd = [
            sys.executable, "-m", "recsys.cli.main", "serve", "--artifacts", str(root),
            "--port", str(args.port), "--metrics-port", "0", "--control", own.url,
            "--exposure-dir", str(Path(tmp) / "exposures"), "--shutdown-grace-seconds", "1",
        ]  # fmt: skip
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            result = asyncio.run(probe(args, root, own, server))
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(timeout=30)
            own.kill()
    result["command"] = " ".join(["python -m benchmarks.probe_faults", *sys.argv[1:]])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
