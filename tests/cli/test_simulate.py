"""`recsys simulate` as a user runs it: a `recsys serve` process, the command, its report."""

from __future__ import annotations

import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from recsys.cli.main import main
from recsys.outcomes import iter_outcomes
from recsys.serving.workers import free_port
from tests.serving.test_exposure_sinks import REPO, _wait_serving


def test_simulate_drives_a_serving_process_and_reports_what_users_did(
    artifacts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port("127.0.0.1")
    log = tmp_path / "serve.log"
    command = [
        sys.executable, "-m", "recsys.cli.main", "serve", "--artifacts", str(artifacts),
        "--port", str(port), "--metrics-port", "0", "--cache-entries", "0",
        "--exposure-dir", str(tmp_path / "exposures"), "--max-queue-delay-ms", "20000",
    ]  # fmt: skip
    with log.open("wb") as out:
        server = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=out)
    target = f"127.0.0.1:{port}"
    outcomes = tmp_path / "outcomes"
    try:
        _wait_serving(target, server, log)
        code = main(
            [
                "simulate", "--artifacts", str(artifacts), "--target", target,
                "--minutes", "10", "--speed", "300", "--rate", "30", "--start-hour", "12",
                "--scenario", "price-inflation", "--onset-minutes", "5", "--seed", "2",
                "--outcomes", str(outcomes), "--timeout", "30",
            ]
        )  # fmt: skip
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    assert code == 0
    text = capsys.readouterr().out
    assert "scenario price-inflation: " in text
    match = re.search(r"(\d+) sessions, (\d+) requests, 0 errors", text)
    assert match is not None, text
    assert int(match[2]) > 0
    assert re.search(r"events: impression [\d,]+, click [\d,]+, order [\d,]+", text)
    assert stat.S_IMODE(outcomes.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in outcomes.iterdir())
    assert sum(1 for _ in iter_outcomes(outcomes)) >= 3 * int(match[2])


def test_a_run_where_no_request_succeeds_exits_1(
    artifacts_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = f"127.0.0.1:{free_port('127.0.0.1')}"  # nothing listens there
    code = main(
        [
            "simulate", "--artifacts", str(artifacts_dir), "--target", target,
            "--minutes", "1", "--speed", "60", "--outcomes", str(tmp_path / "outcomes"),
        ]
    )  # fmt: skip
    assert code == 1
    captured = capsys.readouterr()
    assert "0 requests" in captured.out
    assert "UNAVAILABLE" in captured.out
    assert captured.err == f"recsys: no request to {target} succeeded\n"
