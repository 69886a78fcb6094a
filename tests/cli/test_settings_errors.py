"""Bad settings and start-up failures are one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import logging
import socket
from pathlib import Path

import pytest

from recsys.cli import serve as cli
from recsys.cli.main import main


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("recsys: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("variable", "value", "flag", "expected"),
    [
        ("RECSYS_PORT", "abc", "--port", "expected an integer"),
        ("RECSYS_METRICS_PORT", "9100x", "--metrics-port", "expected an integer"),
        ("RECSYS_DRAIN_SECONDS", "soon", "--drain-seconds", "expected a number"),
        ("RECSYS_SHUTDOWN_GRACE_SECONDS", "x", "--shutdown-grace-seconds", "expected a number"),
    ],
)
def test_a_bad_recsys_variable_is_one_line_naming_flag_and_variable(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    flag: str,
    expected: str,
) -> None:
    monkeypatch.setenv(variable, value)
    assert main(["serve", "--artifacts", str(tmp_path)]) == 2
    line = one_error_line(capsys)
    assert variable in line
    assert flag in line
    assert repr(value) in line
    assert expected in line


def test_a_bad_serve_variable_does_not_break_other_subcommands(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RECSYS_PORT", "abc")
    # recommend fails on its own flags (a clean CliError), not on RECSYS_PORT
    assert main(["recommend", "--user-id", "x", "--lat", "1.0"]) == 2
    line = one_error_line(capsys)
    assert "lat and lon go together" in line
    assert "RECSYS_PORT" not in line


@pytest.mark.parametrize("argv", [["build", "--help"], ["exposures", "archive"], ["serve"]])
def test_a_bad_variable_read_by_another_command_is_one_line_in_every_subcommand(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    monkeypatch.setenv("RECSYS_EXPOSURE_MAX_BYTES", "64MB")
    assert main(argv) == 2
    assert one_error_line(capsys) == (
        "recsys: RECSYS_EXPOSURE_MAX_BYTES='64MB' (the default of `recsys exposures archive "
        "--max-bytes`): expected an integer"
    )


def test_a_flag_overrides_a_bad_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_PORT", "abc")
    parser = argparse.ArgumentParser(prog="recsys")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", "--artifacts", str(tmp_path), "--port", "7"])
    assert cli.serve_settings(args).port == 7


@pytest.mark.parametrize(
    ("variable", "field", "default"),
    [("RECSYS_PORT", "port", 50051), ("RECSYS_METRICS_PORT", "metrics_port", 9100)],
)
def test_a_kubernetes_service_link_port_is_ignored_with_one_warning(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    variable: str,
    field: str,
    default: int,
) -> None:
    monkeypatch.setenv(variable, "tcp://10.0.0.1:50051")
    parser = argparse.ArgumentParser(prog="recsys")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    with caplog.at_level(logging.WARNING):
        settings = cli.serve_settings(parser.parse_args(["serve", "--artifacts", str(tmp_path)]))
    assert getattr(settings, field) == default
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert variable in warnings[0].getMessage()
    assert "Kubernetes service link" in warnings[0].getMessage()


def test_a_port_in_use_is_one_line_and_exit_2(
    artifacts_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(
            [
                "serve",
                "--artifacts", str(artifacts_dir),
                "--exposure-dir", str(tmp_path / "exposures"),
                "--host", "127.0.0.1",
                "--port", str(port),
                "--metrics-port", "0",
            ]
        )  # fmt: skip
    assert code == 2
    # the whole of stderr, gRPC's own C-level log included: found before gRPC tries to bind
    assert capfd.readouterr().err == f"recsys: --port {port}: address already in use\n"


def test_a_metrics_port_in_use_is_one_line_and_exit_2(
    artifacts_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(
            [
                "serve",
                "--artifacts", str(artifacts_dir),
                "--exposure-dir", str(tmp_path / "exposures"),
                "--host", "127.0.0.1",
                "--port", "0",
                "--metrics-port", str(port),
            ]
        )  # fmt: skip
    assert code == 2
    assert one_error_line(capsys) == f"recsys: --metrics-port {port}: address already in use"


@pytest.mark.parametrize("flag", ["--port", "--http-port", "--health-port", "--metrics-port"])
def test_with_workers_a_port_in_use_is_one_line_and_exit_2(
    artifacts_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], flag: str
) -> None:
    """`--workers N` reserves its ports in the parent before any worker starts: a port in use
    there is the same one line as with one process, and no worker is started."""
    ports = {"--port": "0", "--http-port": "0", "--health-port": "0", "--metrics-port": ""}
    with socket.socket() as free:  # the merged metrics endpoint needs a number with workers
        free.bind(("127.0.0.1", 0))
        ports["--metrics-port"] = str(free.getsockname()[1])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports[flag] = str(port)
        code = main(
            [
                "serve",
                "--artifacts", str(artifacts_dir),
                "--exposure-dir", str(tmp_path / "exposures"),
                "--host", "127.0.0.1",
                "--workers", "2",
                *[part for pair in ports.items() for part in pair],
            ]
        )  # fmt: skip
    assert code == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err
    assert err == f"recsys: {flag} {port}: address already in use\n"


@pytest.mark.parametrize(
    ("argv", "variable", "source"),
    [
        (["serve", "--log-format", "xml"], None, "--log-format 'xml'"),
        (["serve"], "RECSYS_LOG_FORMAT", "--log-format 'xml'"),
        (["front", "--backend", "127.0.0.1:1"], "RECSYS_LOG_FORMAT", "RECSYS_LOG_FORMAT 'xml'"),
    ],
)
def test_a_bad_log_format_is_one_line_in_serve_and_front(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    variable: str | None,
    source: str,
) -> None:
    if variable:
        monkeypatch.setenv(variable, "xml")
    assert main([*argv, "--artifacts", str(tmp_path)] if argv[0] == "serve" else argv) == 2
    assert one_error_line(capsys) == f"recsys: {source}: expected one of text, json"
