"""`recsys controller`: bad flags refused in one line, and a run on the file store that stops
cleanly on SIGTERM with its metrics served meanwhile."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli.cli_helpers import run_cli
from tests.control.redis_helpers import free_port
from tests.serving.metrics_page import fetch_metrics


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--look-seconds", "0"], "--look-seconds"),
        (["--lease-seconds", "-1"], "--lease-seconds"),
        (["--window-requests", "0"], "--window-requests"),
        (["--metrics-port", "http"], "--metrics-port"),
        (["--late-seconds", "-5"], "--late-seconds"),
    ],
)
def test_a_bad_flag_is_refused_in_one_line_naming_it(
    artifacts_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    named: str,
) -> None:
    code, _, err = run_cli(
        capsys, "controller", "--artifacts", str(artifacts_dir),
        "--exposures", str(tmp_path), "--outcomes", str(tmp_path), *flags,
    )  # fmt: skip
    assert code == 2
    assert err.startswith(f"recsys: {named} ")
    assert len(err.strip().splitlines()) == 1


def test_it_looks_serves_metrics_and_stops_on_sigterm(artifacts: Path, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "controller.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "recsys.cli.main", "controller",
                "--artifacts", str(artifacts), "--exposures", str(tmp_path / "exposures"),
                "--outcomes", str(tmp_path / "outcomes"), "--look-seconds", "0.5",
                "--metrics-port", str(port), "--no-tracking",
            ],
            env={**os.environ, "RECSYS_CONTROL": ""},
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120.0
        while True:
            assert process.poll() is None, log.read_text()
            try:
                page = fetch_metrics(port, timeout=5)
            except OSError:
                page = ""
            if "recsys_controller_looks_total 2.0" in page:
                break
            assert time.monotonic() < deadline, f"no two looks:\n{log.read_text()}"
            time.sleep(0.2)
        assert "recsys_controller_lease_held 1.0" in page
        assert 'recsys_controller_decisions_total{action="rollback"} 0.0' in page
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    assert "file control store: no lease" in text
    assert "SIGTERM: stopping after this look" in text
    assert text.rstrip().endswith("controller: stopped")
