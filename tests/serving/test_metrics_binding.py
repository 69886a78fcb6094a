"""The metrics endpoint listens on the loopback unless told otherwise."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from recsys.serving.server import RunningServer
from tests.serving.toy_pipeline import ToyOpener, toy_settings

OTHER_ADDRESS = "127.0.0.2"
"""Stands for "another interface" while every socket stays on the loopback."""


def accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture
def other_address() -> str:
    """127.0.0.2, skipping only where the machine itself cannot bind it (Linux routes all of
    127.0.0.0/8 to the loopback; macOS and some containers give it only 127.0.0.1). Probed
    before the server starts, so a server that fails to start on it fails the test."""
    try:
        with socket.socket() as probe:
            probe.bind((OTHER_ADDRESS, 0))
    except OSError as e:
        pytest.skip(f"{OTHER_ADDRESS} is not bindable on this machine: {e}")
    return OTHER_ADDRESS


async def test_metrics_bind_the_loopback_even_when_grpc_listens_elsewhere(
    tmp_path: Path, other_address: str
) -> None:
    running = await RunningServer.start(toy_settings(tmp_path, host=other_address), ToyOpener())
    try:
        assert accepts("127.0.0.1", running.metrics_port)
        assert not accepts(other_address, running.metrics_port)
    finally:
        await running.stop()


async def test_metrics_host_says_where_metrics_bind(tmp_path: Path, other_address: str) -> None:
    settings = toy_settings(tmp_path, metrics_host=other_address)
    running = await RunningServer.start(settings, ToyOpener())
    try:
        assert accepts(other_address, running.metrics_port)
        assert not accepts("127.0.0.1", running.metrics_port)
    finally:
        await running.stop()
