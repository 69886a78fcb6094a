"""The metrics endpoint listens on the loopback unless told otherwise."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from recsys.serving.server import RunningServer
from tests.serving.toy_pipeline import ToyOpener, toy_settings


def accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


async def test_metrics_bind_the_loopback_even_when_grpc_listens_elsewhere(tmp_path: Path) -> None:
    # 127.0.0.2 stands for "another interface" while every socket stays on the loopback.
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.2", 0))
    except OSError:
        pytest.skip("127.0.0.2 is not bindable here")
    running = await RunningServer.start(toy_settings(tmp_path, host="127.0.0.2"), ToyOpener())
    try:
        assert accepts("127.0.0.1", running.metrics_port)
        assert not accepts("127.0.0.2", running.metrics_port)
    finally:
        await running.stop()


async def test_metrics_host_says_where_metrics_bind(tmp_path: Path) -> None:
    settings = toy_settings(tmp_path, metrics_host="127.0.0.2")
    try:
        running = await RunningServer.start(settings, ToyOpener())
    except Exception:
        pytest.skip("127.0.0.2 is not bindable here")
    try:
        assert accepts("127.0.0.2", running.metrics_port)
        assert not accepts("127.0.0.1", running.metrics_port)
    finally:
        await running.stop()
