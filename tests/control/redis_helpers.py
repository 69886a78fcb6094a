"""Real-Redis fixtures: a server at 127.0.0.1:6379 (skip if none), prefixes, and throwaway
servers of the test's own (with or without persistence, plaintext or TLS)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from recsys.control.redis_auth import redis_client
from recsys.settings import RedisAuth

REDIS_URL = os.environ.get("RECSYS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def redis_answers(url: str, auth: RedisAuth | None = None) -> bool:
    client = redis_client(url, auth or RedisAuth(), socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError):
        return False
    finally:
        client.close()


@pytest.fixture
def redis_url() -> str:
    if not redis_answers(REDIS_URL):
        pytest.skip(f"no Redis answers at {REDIS_URL} (CI starts one; locally: redis-server)")
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix no other test or user owns; every key under it is deleted afterwards."""
    prefix = f"recsys-test-{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class ServerTls:
    """The PEM files a TLS redis-server presents (``cert``, ``key``) and trusts (``ca``)."""

    cert: Path
    key: Path
    ca: Path


@dataclass
class ThrowawayRedis:
    """A redis-server of our own on a free port, which a test may stop and start again."""

    port: int
    directory: Path
    persistence: bool = True
    """An append-only file synced at every write: a restart keeps the data. False: none at all
    (``--save '' --appendonly no``), so a restart comes back empty, as a Redis whose volume
    was lost does."""
    tls: ServerTls | None = None
    """Set: the port speaks only TLS (``rediss://``; clients are not asked for certificates)."""
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    @property
    def auth(self) -> RedisAuth:
        """What a client needs to be let in: the CA of the server's certificate under TLS."""
        return RedisAuth(ca_file=self.tls.ca if self.tls else None)

    def arguments(self) -> list[str]:
        ports = ["--port", str(self.port)]
        if self.tls is not None:
            ports = [
                "--port", "0", "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key),
                "--tls-ca-cert-file", str(self.tls.ca), "--tls-auth-clients", "no",
            ]  # fmt: skip
        persistence = ["--appendonly", "yes", "--appendfsync", "always"]
        if not self.persistence:
            persistence = ["--appendonly", "no"]
        return [
            "redis-server", *ports, "--bind", "127.0.0.1", "--save", "", *persistence,
            "--dir", str(self.directory),
        ]  # fmt: skip

    def start(self) -> None:
        log = self.directory / f"redis-{self.port}.log"
        with log.open("ab") as output:
            self.process = subprocess.Popen(self.arguments(), stdout=output, stderr=output)
        deadline = time.monotonic() + 10
        while not redis_answers(self.url, self.auth):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                last = log.read_text(errors="replace").strip().splitlines()[-3:]
                pytest.fail(f"redis-server on port {self.port} did not start: {' / '.join(last)}")
            time.sleep(0.05)

    def stop(self, *, graceful: bool = False) -> None:
        """Kill the server (a crash), or with ``graceful`` ask it to shut down (SIGTERM, as
        Kubernetes stops a pod)."""
        if self.process is not None:
            if graceful:
                self.process.terminate()
            else:
                self.process.kill()
            self.process.wait(timeout=30)
            self.process = None


def require_redis_server() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed; cannot start a Redis of the test's own")


@contextmanager
def running(server: ThrowawayRedis) -> Iterator[ThrowawayRedis]:
    """``server`` started, and stopped at the end whatever the test did to it."""
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def throwaway_redis(tmp_path: Path) -> Iterator[ThrowawayRedis]:
    require_redis_server()
    with running(ThrowawayRedis(port=free_port(), directory=tmp_path)) as server:
        yield server
