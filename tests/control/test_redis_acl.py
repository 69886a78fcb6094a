"""Redis with the ACL users of deploy/redis-acl.conf: a real redis-server of our own.

Servers log in as ``recsys-server`` (read the control documents and feature rows, follow the
notifications, add exposure records), ops as ``recsys-ops`` (write the documents); each
password comes from a file.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis

from recsys.cli.main import main
from recsys.control.redis_auth import RedisAuthError, check_credentials, redis_client
from recsys.control.redis_store import RedisStore
from recsys.control.store import EXPERIMENTS, ROUTING, StoreError, StoreForbidden
from recsys.control.watch import watch
from recsys.serving.pipeline import open_pipeline
from recsys.serving.server import RunningServer
from recsys.settings import RedisAuth, ServeSettings
from recsys.v1 import recommender_pb2, recommender_pb2_grpc
from tests.control.redis_helpers import free_port

ACL_FILE = Path(__file__).resolve().parents[2] / "deploy" / "redis-acl.conf"
PREFIX = "recsys:"  # the prefix the deployment's ACL grants


@dataclass
class AclRedis:
    port: int
    passwords: dict[str, Path]
    """User -> the file holding its password."""

    def url(self, user: str) -> str:
        return f"redis://{user}@127.0.0.1:{self.port}/0"

    def auth(self, user: str) -> RedisAuth:
        return RedisAuth(password_file=self.passwords[user])


def acl_with_passwords(passwords: dict[str, str]) -> str:
    """deploy/redis-acl.conf with each user's placeholder hash replaced by its password's."""
    lines = []
    for line in ACL_FILE.read_text().splitlines():
        user = line.split()[1]
        if user in passwords:
            digest = hashlib.sha256(passwords[user].encode()).hexdigest()
            line, replaced = re.subn(r"#[0-9a-f]{64}", "#" + digest, line)
            assert replaced == 1, f"{ACL_FILE}: user {user} has no password hash to replace"
        lines.append(line)
    return "\n".join(lines) + "\n"


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[AclRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    plain = {user: secrets.token_urlsafe(24) for user in ("recsys-server", "recsys-ops")}
    files = {}
    for user, password in plain.items():
        files[user] = tmp_path / f"{user}.password"
        files[user].write_text(password + "\n")  # as `kubectl create secret --from-file` keeps it
        files[user].chmod(0o600)
    acl = tmp_path / "users.acl"
    acl.write_text(acl_with_passwords(plain))
    port = free_port()
    process = subprocess.Popen(
        [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(tmp_path), "--aclfile", str(acl),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    server = AclRedis(port, files)
    client = redis_client(server.url("recsys-ops"), server.auth("recsys-ops"))
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert process.poll() is None, "redis-server refused the ACL file"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield server
    finally:
        client.close()
        process.kill()
        process.wait(timeout=10)


ROUTING_BODY = {"index": "abc", "models": {"ranker": {"production": "v1"}}}


def test_the_server_user_reads_documents_but_cannot_write_them(acl_redis: AclRedis) -> None:
    ops = RedisStore(acl_redis.url("recsys-ops"), prefix=PREFIX, auth=acl_redis.auth("recsys-ops"))
    server = RedisStore(
        acl_redis.url("recsys-server"), prefix=PREFIX, auth=acl_redis.auth("recsys-server")
    )
    try:
        written = ops.write(ROUTING, ROUTING_BODY, expected_version=0, author="ops")
        read = server.read(ROUTING)
        assert read is not None
        assert read.version == written.version == 1
        assert dict(read.body) == ROUTING_BODY
        with pytest.raises(StoreForbidden, match="user 'recsys-server' may not write routing"):
            server.write(ROUTING, ROUTING_BODY, expected_version=1, author="server")
        assert ops.read_version(ROUTING) == 1
    finally:
        ops.close()
        server.close()


def test_the_server_user_may_add_exposures_and_read_features_only_under_its_keys(
    acl_redis: AclRedis,
) -> None:
    ops = redis_client(acl_redis.url("recsys-ops"), acl_redis.auth("recsys-ops"))
    server = redis_client(acl_redis.url("recsys-server"), acl_redis.auth("recsys-server"))
    try:
        ops.set(f"{PREFIX}features-1:uv:u1", b"row")
        assert server.mget([f"{PREFIX}features-1:uv:u1"]) == [b"row"]
        assert server.xadd(f"{PREFIX}exposures", {"line": "{}"})
        for write in (
            lambda: server.set(f"{PREFIX}features-1:uv:u1", b"forged"),
            lambda: server.xadd(f"{PREFIX}control:{{routing}}", {"line": "{}"}),
            lambda: server.delete(f"{PREFIX}exposures"),
            lambda: server.get("elsewhere"),
            lambda: server.publish(f"{PREFIX}control:{{routing}}:changed", "9"),
            lambda: server.flushdb(),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                write()
        assert ops.get(f"{PREFIX}features-1:uv:u1") == b"row"
    finally:
        ops.close()
        server.close()


async def test_a_watcher_logged_in_as_the_server_user_follows_new_versions(
    acl_redis: AclRedis, tmp_path: Path
) -> None:
    ops = RedisStore(acl_redis.url("recsys-ops"), prefix=PREFIX, auth=acl_redis.auth("recsys-ops"))
    ops.write(ROUTING, ROUTING_BODY, expected_version=0, author="ops")
    watcher = watch(
        acl_redis.url("recsys-server"),
        ROUTING,
        artifacts=tmp_path,
        prefix=PREFIX,
        poll_seconds=30.0,  # far beyond the test: the notification must do it
        auth=acl_redis.auth("recsys-server"),
    )
    try:
        async with asyncio.timeout(30):
            first = await anext(watcher)
            assert first.version == 1
            await asyncio.to_thread(
                ops.write, ROUTING, {**ROUTING_BODY, "index": "def"}, expected_version=1, author="o"
            )
            second = await anext(watcher)
        assert second.version == 2
        assert second.body["index"] == "def"
        assert watcher.outages == 0
    finally:
        await watcher.aclose()
        ops.close()


def test_a_wrong_password_is_one_line_naming_the_setting(
    acl_redis: AclRedis, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password\n")
    auth = RedisAuth(password_file=wrong)
    with pytest.raises(RedisAuthError, match="--redis-password-file") as refused:
        check_credentials(acl_redis.url("recsys-server"), auth)
    assert "recsys-server" in str(refused.value)
    assert "\n" not in str(refused.value)
    assert "not-the-password" not in str(refused.value)
    store = RedisStore(acl_redis.url("recsys-ops"), prefix=PREFIX, auth=auth)
    try:
        with pytest.raises(StoreError, match=r"refused user 'recsys-ops'.*--redis-password-file"):
            store.read(EXPERIMENTS)
    finally:
        store.close()


def test_commands_with_a_wrong_password_exit_2_with_one_line(
    acl_redis: AclRedis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = tmp_path / "wrong.password"
    wrong.write_text("nope\n")
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    control = ["--control", acl_redis.url("recsys-server"), "--redis-password-file", str(wrong)]
    code = main(["serve", "--artifacts", str(artifacts), "--port", "0", *control])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert "--control" in err
    assert "--redis-password-file" in err
    code = main(["experiments", "show", "--artifacts", str(artifacts), *control])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert "--redis-password-file" in err
    assert "Traceback" not in err


def test_a_password_in_the_url_and_a_password_file_together_are_refused(
    acl_redis: AclRedis,
) -> None:
    url = f"redis://recsys-ops:secret@127.0.0.1:{acl_redis.port}/0"
    with pytest.raises(ValueError, match="keep the password in the file only") as refused:
        redis_client(url, acl_redis.auth("recsys-ops"))
    assert "secret" not in str(refused.value)


async def test_a_server_logged_in_as_the_server_user_serves_follows_and_logs(
    acl_redis: AclRedis, artifacts: Path, tmp_path: Path
) -> None:
    ops_flags = [
        "--artifacts", str(artifacts), "--control", acl_redis.url("recsys-ops"),
        "--redis-password-file", str(acl_redis.passwords["recsys-ops"]),
    ]  # fmt: skip
    assert main(["control", "reseed", "--from", str(artifacts / "control"), *ops_flags]) == 0
    server_url = acl_redis.url("recsys-server")
    settings = ServeSettings(
        artifacts=artifacts,
        port=0,
        metrics_port=0,
        control=server_url,
        control_prefix=PREFIX,
        control_poll_seconds=30.0,
        exposure_sink=server_url,
        exposure_dir=tmp_path / "exposures",
        redis_password_file=acl_redis.passwords["recsys-server"],
        drain_seconds=1,
    )
    running = await RunningServer.start(settings, open_pipeline)
    ops = RedisStore(acl_redis.url("recsys-ops"), prefix=PREFIX, auth=acl_redis.auth("recsys-ops"))
    try:
        await running.wait_ready()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = recommender_pb2_grpc.RecommenderStub(channel)
            request = recommender_pb2.RecommendRequest(user_id="user-0000001", num_results=5)
            first = await stub.Recommend(request, timeout=30)
            assert first.items
            current = ops.read(EXPERIMENTS)
            assert current is not None
            ops.write(EXPERIMENTS, current.body, expected_version=current.version, author="ops")
            followed = False
            for _ in range(600):  # bounded: the notification arrives in milliseconds
                reply = await stub.Recommend(request, timeout=30)
                followed = reply.config_version != first.config_version
                if followed:
                    break
                await asyncio.sleep(0.05)
            assert followed
    finally:
        await running.stop()
        ops.close()
    client = redis_client(acl_redis.url("recsys-ops"), acl_redis.auth("recsys-ops"))
    try:
        assert client.xlen(settings.exposure_stream) >= 2
    finally:
        client.close()
