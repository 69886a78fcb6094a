from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from recsys.cli import serve as cli
from recsys.cli.common import CliError
from recsys.serving.server import RunningServer
from recsys.settings import ServeSettings
from tests.serving.toy_pipeline import MODEL_VERSION, ToyOpener


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="recsys")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_serve_flags_become_frozen_settings(tmp_path: Path) -> None:
    args = parse(
        [
            "serve",
            "--artifacts", str(tmp_path),
            "--port", "0",
            "--metrics-port", "9200",
            "--host", "0.0.0.0",
            "--control", "redis://127.0.0.1:6379/0",
            "--batch-max-size", "64",
            "--batch-max-delay-ms", "3.5",
            "--executor-threads", "1",
            "--search-threads", "2",
            "--drain-seconds", "2",
        ]
    )  # fmt: skip
    assert args.func is cli.run_serve
    settings = cli.serve_settings(args)
    assert settings == ServeSettings(
        artifacts=tmp_path,
        host="0.0.0.0",
        port=0,
        metrics_port=9200,
        control="redis://127.0.0.1:6379/0",
        batch_max_size=64,
        batch_max_delay_ms=3.5,
        executor_threads=1,
        search_threads=2,
        drain_seconds=2.0,
    )


def test_serve_defaults_come_from_recsys_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_ARTIFACTS", str(tmp_path))
    monkeypatch.setenv("RECSYS_PORT", "6001")
    monkeypatch.setenv("RECSYS_BATCH_MAX_SIZE", "16")
    settings = cli.serve_settings(parse(["serve", "--metrics-port", "0"]))
    assert settings.artifacts == tmp_path
    assert settings.port == 6001
    assert settings.batch_max_size == 16
    assert settings.metrics_port == 0
    assert cli.serve_settings(parse(["serve", "--port", "7"])).port == 7  # a flag beats the env


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--workers", "0"], "--workers is 0"),
        (["--workers", "2", "--metrics-port", "0"], "--metrics-port 0 with --workers > 1"),
        (["--cache-entries", "-1"], "--cache-entries is -1"),
        (["--max-in-flight", "-1"], "--max-in-flight is -1"),
        (["--port", "70000"], "--port is 70000"),
        (["--metrics-port", "-1"], "--metrics-port is -1"),
        (["--health-port", "-2"], "--health-port is -2; expected -1 \\(off\\)"),
        (["--health-port", "65536"], "--health-port is 65536"),
        (["--batch-max-size", "0"], "--batch-max-size is 0"),
        (["--batch-max-delay-ms", "-1"], "--batch-max-delay-ms is -1"),
        (["--executor-threads", "0"], "--executor-threads is 0; expected >= 1"),
        (["--search-threads", "0"], "--search-threads is 0; expected >= 1"),
        (["--pin-workers", "yes"], "--pin-workers 'yes': expected one of auto, on, off"),
    ],
)
def test_bad_serve_flags_are_clear_errors(tmp_path: Path, flags: list[str], message: str) -> None:
    with pytest.raises(CliError, match=message):
        cli.serve_settings(parse(["serve", "--artifacts", str(tmp_path), *flags]))


def test_a_missing_artifact_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CliError, match="no such directory"):
        cli.serve_settings(parse(["serve", "--artifacts", str(tmp_path / "absent")]))


@pytest.fixture
async def target(tmp_path: Path) -> AsyncIterator[str]:
    settings = ServeSettings(artifacts=tmp_path, port=0, metrics_port=0)
    running = await RunningServer.start(settings, ToyOpener())
    await running.wait_ready()
    yield f"127.0.0.1:{running.port}"
    await running.stop()


async def test_recommend_prints_the_response_as_json(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse(
        ["recommend", "--target", target, "--user-id", "dora", "--num-results", "3",
         "--lat", "52.5", "--lon", "13.4", "--surface", "home"]
    )  # fmt: skip
    assert await asyncio.to_thread(args.func, args) == 0  # a blocking client: off the loop
    printed = json.loads(capsys.readouterr().out)
    assert len(printed["items"]) == 3
    assert isinstance(printed["items"][0]["sku_id"], int)
    assert printed["model_version"] == MODEL_VERSION
    assert printed["degraded"] is False
    assert printed["experiments"][0]["layer"] == "feed"


async def test_recommend_reports_the_status_and_the_field(target: str) -> None:
    args = parse(["recommend", "--target", target, "--user-id", "x", "--num-results", "500"])
    with pytest.raises(CliError, match=r"INVALID_ARGUMENT: num_results: is 500"):
        await asyncio.to_thread(args.func, args)


def test_recommend_needs_lat_and_lon_together() -> None:
    args = parse(["recommend", "--user-id", "x", "--lat", "1.0"])
    with pytest.raises(CliError, match="lat and lon go together"):
        args.func(args)
