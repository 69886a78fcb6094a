"""TLS and mutual TLS on the gRPC port: real certificates, a real grpc.aio server."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from recsys.cli.main import main
from recsys.serving.server import RunningServer
from recsys.serving.tls import TlsError, channel_credentials, server_credentials
from recsys.v1 import recommender_pb2, recommender_pb2_grpc
from tests.serving.certificates import Authority, make_authority
from tests.serving.toy_pipeline import ToyOpener, toy_settings

REQUEST = recommender_pb2.RecommendRequest(user_id="alice", num_results=3)


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return make_authority(tmp_path / "pki", "first")


async def call(port: int, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    """One Recommend on a new channel (so a new TLS handshake); its status code."""
    target = f"localhost:{port}"
    channel = (
        grpc.aio.insecure_channel(target)
        if credentials is None
        else grpc.aio.secure_channel(target, credentials)
    )
    async with channel:
        try:
            await recommender_pb2_grpc.RecommenderStub(channel).Recommend(REQUEST, timeout=20)
        except grpc.aio.AioRpcError as e:
            return e.code()
    return grpc.StatusCode.OK


async def started(tmp_path: Path, **tls: Path) -> RunningServer:
    running = await RunningServer.start(toy_settings(tmp_path, **tls), ToyOpener())
    await running.wait_ready()
    return running


@pytest.fixture
async def tls_server(tmp_path: Path, authority: Authority) -> AsyncIterator[RunningServer]:
    cert, key = authority.leaf("server", server=True)
    running = await started(tmp_path, tls_cert=cert, tls_key=key)
    yield running
    await running.stop()


@pytest.fixture
async def mtls_server(tmp_path: Path, authority: Authority) -> AsyncIterator[RunningServer]:
    cert, key = authority.leaf("server", server=True)
    running = await started(tmp_path, tls_cert=cert, tls_key=key, tls_client_ca=authority.ca)
    yield running
    await running.stop()


async def test_a_tls_client_is_served_and_a_plaintext_client_is_not(
    tls_server: RunningServer, authority: Authority
) -> None:
    assert await call(tls_server.port, channel_credentials(authority.ca)) == grpc.StatusCode.OK
    assert await call(tls_server.port, None) == grpc.StatusCode.UNAVAILABLE


async def test_a_client_that_does_not_trust_the_servers_ca_is_refused(
    tls_server: RunningServer, tmp_path: Path
) -> None:
    stranger = make_authority(tmp_path / "other", "stranger")
    code = await call(tls_server.port, channel_credentials(stranger.ca))
    assert code == grpc.StatusCode.UNAVAILABLE


async def test_with_mutual_tls_a_client_without_a_certificate_is_refused(
    mtls_server: RunningServer, authority: Authority, tmp_path: Path
) -> None:
    assert await call(mtls_server.port, channel_credentials(authority.ca)) == (
        grpc.StatusCode.UNAVAILABLE
    )
    stranger = make_authority(tmp_path / "other", "stranger")
    foreign_cert, foreign_key = stranger.leaf("client", server=False)
    code = await call(
        mtls_server.port, channel_credentials(authority.ca, foreign_cert, foreign_key)
    )
    assert code == grpc.StatusCode.UNAVAILABLE
    cert, key = authority.leaf("client", server=False)
    assert await call(mtls_server.port, channel_credentials(authority.ca, cert, key)) == (
        grpc.StatusCode.OK
    )


def replace_file(source: Path, target: Path) -> None:
    """Put ``source``'s bytes at ``target`` the way a Secret update does: a new file renamed in."""
    staged = target.with_suffix(".new")
    staged.write_bytes(source.read_bytes())
    os.replace(staged, target)


async def test_a_renewed_certificate_serves_new_connections_without_a_restart(
    tmp_path: Path, authority: Authority
) -> None:
    cert, key = authority.leaf("server", server=True)
    served_cert, served_key = tmp_path / "tls.crt", tmp_path / "tls.key"
    replace_file(cert, served_cert)
    replace_file(key, served_key)
    running = await started(tmp_path, tls_cert=served_cert, tls_key=served_key)
    try:
        renewed = make_authority(tmp_path / "renewed", "renewed")
        assert await call(running.port, channel_credentials(renewed.ca)) != grpc.StatusCode.OK
        new_cert, new_key = renewed.leaf("server", server=True)
        replace_file(new_key, served_key)
        replace_file(new_cert, served_cert)
        assert await call(running.port, channel_credentials(renewed.ca)) == grpc.StatusCode.OK
        assert await call(running.port, channel_credentials(authority.ca)) != grpc.StatusCode.OK
        assert running.tls is not None
        assert running.tls.reloads >= 1
    finally:
        await running.stop()


async def test_a_changed_key_that_does_not_match_is_refused_and_the_old_pair_keeps_serving(
    tmp_path: Path, authority: Authority
) -> None:
    cert, key = authority.leaf("server", server=True)
    _, other_key = authority.leaf("other", server=True)
    served_key = tmp_path / "tls.key"
    replace_file(key, served_key)
    running = await started(tmp_path, tls_cert=cert, tls_key=served_key)
    try:
        replace_file(other_key, served_key)  # the certificate was not renewed with it
        assert await call(running.port, channel_credentials(authority.ca)) == grpc.StatusCode.OK
        assert running.tls is not None
        assert running.tls.refused == 1
    finally:
        await running.stop()


def test_a_key_that_does_not_match_its_certificate_names_both_flags(
    authority: Authority,
) -> None:
    cert, _ = authority.leaf("server", server=True)
    _, other_key = authority.leaf("other", server=True)
    with pytest.raises(TlsError, match=r"--tls-cert .* / --tls-key .*: not a matching"):
        server_credentials(cert, other_key, None)
    with pytest.raises(TlsError, match="--tls-key is missing"):
        server_credentials(cert, None, None)
    with pytest.raises(TlsError, match="--tls-client-ca needs --tls-cert"):
        server_credentials(None, None, authority.ca)


def test_serve_with_a_key_that_does_not_match_exits_2_with_one_line(
    tmp_path: Path, authority: Authority, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, _ = authority.leaf("server", server=True)
    _, other_key = authority.leaf("other", server=True)
    code = main(
        [
            "serve",
            "--artifacts",
            str(tmp_path),
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(other_key),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert "--tls-key" in err
    assert "Traceback" not in err


async def test_recommend_and_health_commands_speak_mutual_tls(
    mtls_server: RunningServer, authority: Authority, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = authority.leaf("cli", server=False)
    target = ["--target", f"localhost:{mtls_server.port}", "--tls-ca", str(authority.ca)]
    client = ["--tls-client-cert", str(cert), "--tls-client-key", str(key)]
    assert await asyncio.to_thread(main, ["health", *target, *client]) == 0
    assert "SERVING" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["recommend", *target, *client, "--user-id", "u1"]) == 0
    assert '"model_version"' in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["health", *target]) == 1  # no client certificate
    assert await asyncio.to_thread(main, ["health", *target[:2]]) == 1  # plaintext
