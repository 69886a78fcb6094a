"""Redis over TLS (``rediss://`` and ``--redis-ca-file``): a real redis-server of our own whose
port speaks only TLS, with certificates made for the test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from recsys.cli.main import main
from recsys.control.backends import open_store
from recsys.control.redis_auth import RedisAuthError, check_credentials
from recsys.control.store import DOCUMENTS, EXPERIMENTS, StoreError, StoreUnavailable
from recsys.serving.metrics import ServingMetrics
from recsys.serving.pipeline import open_pipeline
from recsys.settings import RedisAuth, ServeSettings
from tests.control.redis_helpers import (
    ServerTls,
    ThrowawayRedis,
    free_port,
    require_redis_server,
    running,
)
from tests.serving.certificates import Authority, make_authority

CONNECTED = "recsys_control_plane_connected"


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return make_authority(tmp_path / "pki", "redis")


@pytest.fixture
def tls_redis(tmp_path: Path, authority: Authority) -> Iterator[ThrowawayRedis]:
    require_redis_server()
    cert, key = authority.leaf("redis", server=True)
    tls = ServerTls(cert=cert, key=key, ca=authority.ca)
    with running(ThrowawayRedis(free_port(), tmp_path, persistence=False, tls=tls)) as server:
        yield server


def refused_in_one_line(
    url: str, auth: RedisAuth, artifacts: Path, capsys: pytest.CaptureFixture[str]
) -> list[str]:
    """What refuses ``url`` with ``auth``: the start-up check, the control store, `recsys serve`
    and `recsys control show`. Each says it in one line (no traceback); the four lines."""
    with pytest.raises(RedisAuthError) as checked:
        check_credentials(url, auth)
    store = open_store(url, artifacts, auth=auth)
    try:
        with pytest.raises(StoreError) as read:
            store.read(EXPERIMENTS)
    finally:
        store.close()
    assert not isinstance(read.value, StoreUnavailable)  # a setting to fix, not an outage
    flags = ["--artifacts", str(artifacts), "--control", url]
    if auth.ca_file is not None:
        flags += ["--redis-ca-file", str(auth.ca_file)]
    served = main(["serve", "--port", "0", *flags])
    serve_err = capsys.readouterr().err
    shown = main(["control", "show", EXPERIMENTS, *flags])
    show_err = capsys.readouterr().err
    assert (served, shown) == (2, 2)
    assert "--control" in serve_err
    lines = [str(checked.value), str(read.value), serve_err, show_err]
    for line in lines:
        assert line.rstrip("\n").count("\n") == 0, line
        assert "Traceback" not in line
    return lines


async def test_a_server_reads_and_follows_the_control_documents_over_tls_with_the_ca_given(
    tls_redis: ThrowawayRedis, artifacts: Path, tmp_path: Path
) -> None:
    ca = tls_redis.auth.ca_file
    assert tls_redis.url.startswith("rediss://")
    assert ca is not None
    ops = ["--artifacts", str(artifacts), "--control", tls_redis.url, "--redis-ca-file", str(ca)]
    assert main(["control", "reseed", "--from", str(artifacts / "control"), *ops]) == 0
    settings = ServeSettings(
        artifacts=artifacts,
        control=tls_redis.url,
        redis_ca_file=ca,
        exposure_dir=tmp_path / "exposures",
        control_poll_seconds=0.1,
    )
    metrics = ServingMetrics()
    pipeline = await open_pipeline(settings, metrics)
    store = open_store(tls_redis.url, artifacts, auth=tls_redis.auth)
    try:
        assert {name: d.version for name, d in pipeline.snapshot.documents.items()} == {
            name: 1 for name in DOCUMENTS
        }
        current = store.read(EXPERIMENTS)
        assert current is not None
        store.write(EXPERIMENTS, current.body, expected_version=1, author="ops")
        deadline = time.monotonic() + 60  # a bound for a slow machine, not a measurement
        while pipeline.snapshot.documents[EXPERIMENTS].version != 2:
            assert time.monotonic() < deadline, "the server did not follow version 2 over TLS"
            await asyncio.sleep(0.05)
        for name in DOCUMENTS:
            assert metrics.registry.get_sample_value(CONNECTED, {"document": name}) == 1
    finally:
        store.close()
        await pipeline.close()


def test_a_client_without_the_ca_or_with_another_ca_is_refused_naming_the_ca_setting(
    tls_redis: ThrowawayRedis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stranger = make_authority(tmp_path / "other", "stranger")
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    for auth, trusted in (
        (RedisAuth(), "the system's roots (--redis-ca-file (RECSYS_REDIS_CA_FILE) not given)"),
        (RedisAuth(ca_file=stranger.ca), f"--redis-ca-file (RECSYS_REDIS_CA_FILE) {stranger.ca}"),
    ):
        for line in refused_in_one_line(tls_redis.url, auth, artifacts, capsys):
            assert f"TLS certificate does not verify against {trusted}" in line
            assert "certificate" in line.rsplit(":", 1)[-1]  # and why: openssl's reason


def test_plaintext_to_the_tls_port_is_refused_naming_rediss(
    tls_redis: ThrowawayRedis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = tls_redis.url.replace("rediss://", "redis://", 1)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    for line in refused_in_one_line(plain, RedisAuth(), artifacts, capsys):
        assert f"the server speaks TLS on port {tls_redis.port}; use a rediss:// URL" in line
