"""The HTML report from real window summaries: sections per version and arm, plots that are
PNG files, the alerts table; and, where Chromium is installed, a browser renders it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from recsys.monitoring.baseline import BaselineBins
from recsys.monitoring.quality import quality_record, quality_stats
from recsys.monitoring.report import write_report
from recsys.monitoring.summaries import SummaryLog, iter_summaries
from recsys.monitoring.windows import DriftWindows
from tests.monitoring.test_baseline import NAMES, make_baseline
from tests.monitoring.test_quality import joined
from tests.monitoring.test_windows import Clock

PNG = b"\x89PNG\r\n\x1a\n"


def summaries(directory: Path) -> None:
    """Twelve 10-second slots of the training distribution, then the price jumps, summarised
    every slot; and two quality windows."""
    baseline, features, scores = make_baseline(np.random.default_rng(8))
    bins = BaselineBins.compile("v1", baseline, NAMES)
    clock = Clock()
    windows = DriftWindows(60.0, slots=6, min_requests=100, clock=clock)
    log = SummaryLog(directory)
    rows = np.arange(len(scores)) % 2000
    for step in range(24):
        live = features[rows[step * 100 : step * 100 + 2000]].copy()
        if step >= 12:
            live[:, 0] *= 3  # price inflation
        counts = bins.count(live, scores[: len(live)], np.zeros(len(live), np.int64), 1)[0]
        windows.add([("v1", "exp/a", 1500, counts)], {"v1": bins})
        log.write_windows(windows.stats(), now=clock.now)
        clock.now += 10
    for start in (0.0, 60.0):
        requests = [joined(f"r{start}{i}", start + i, [i % 5]) for i in range(40)]
        log.append(
            quality_record(s, start + 60) for s in quality_stats(requests, start, start + 60)
        )


def test_the_report_has_a_section_per_version_and_arm_with_plots_and_the_alerts(
    tmp_path: Path,
) -> None:
    summaries(tmp_path / "monitor")
    files = write_report(iter_summaries(tmp_path / "monitor"), tmp_path / "report")
    page = files.index.read_text()
    assert "model v1 · arm all" in page
    assert "model v1 · arm exp/a" in page
    assert "RecsysFeatureDrift" in page
    assert "<td>price</td>" in page  # the inflated feature is in the alerts table
    assert "<td>distance</td>" not in page  # the unchanged one is not
    for image in files.images:
        assert image.read_bytes().startswith(PNG)
        assert f'src="{image.name}"' in page
    assert len(files.images) == 2 * 3  # distributions, PSI, quality for each of the two keys


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_a_headless_browser_renders_the_report(tmp_path: Path) -> None:
    summaries(tmp_path / "monitor")
    files = write_report(iter_summaries(tmp_path / "monitor"), tmp_path / "report")
    shot = tmp_path / "shot.png"
    assert CHROMIUM is not None
    subprocess.run(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600",
            f"--screenshot={shot}", files.index.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )  # fmt: skip
    data = shot.read_bytes()
    assert data.startswith(PNG)
    assert len(data) > 20_000  # a page with figures, not a blank one
