"""`recsys monitor report` and `recsys monitor quality` as a person runs them."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from recsys.cli.main import main
from recsys.linelog.files import RotatingFileWriter
from recsys.monitoring.summaries import iter_summaries
from recsys.outcomes.events import OutcomeEvent, encode_events
from tests.monitoring.test_report import summaries


def test_report_writes_the_page_and_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summaries(tmp_path / "exposures" / "monitor")
    out = tmp_path / "report"
    code = main(
        ["monitor", "report", "--artifacts", str(tmp_path), "--exposures",
         str(tmp_path / "exposures"), "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    assert str(out / "index.html") in capsys.readouterr().out
    assert "RecsysFeatureDrift" in (out / "index.html").read_text()


def test_report_without_summaries_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["monitor", "report", "--artifacts", str(tmp_path), "--monitor-dir",
         str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "--monitor-dir" in err


def test_quality_joins_the_logs_and_appends_quality_windows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exposures, outcomes = tmp_path / "exposures", tmp_path / "outcomes"
    writer = RotatingFileWriter(exposures)
    events = RotatingFileWriter(outcomes)
    try:
        for n in range(30):
            ts = 1_020.0 + n  # one 60-second window: [1020, 1080)
            record = {
                "request_id": f"r{n}", "ts": ts, "user_id": "u", "model_version": "v1",
                "sku_ids": [1, 2, 3], "scores": [0.3, 0.2, 0.1], "exposures": [],
            }  # fmt: skip
            writer.write_lines([orjson.dumps(record).decode() + "\n"])
            clicks = [
                OutcomeEvent(f"r{n}", "u", sku, position, "impression", ts + 1)
                for position, sku in enumerate((1, 2, 3))
            ]
            if n % 3 == 0:
                clicks.append(OutcomeEvent(f"r{n}", "u", 1, 0, "click", ts + 2))
            events.write_lines(encode_events(clicks))
        events.write_lines(encode_events([OutcomeEvent("late", "u", 1, 0, "impression", 5_000.0)]))
    finally:
        writer.close()
        events.close()
    code = main(
        ["monitor", "quality", "--artifacts", str(tmp_path), "--exposures", str(exposures),
         "--outcomes", str(outcomes), "--window", "60"]
    )  # fmt: skip
    assert code == 0
    assert "requests 30 CTR 0.1111" in capsys.readouterr().out  # 10 clicks / 90 impressions
    records = list(iter_summaries(exposures / "monitor", kind="quality"))
    every = [r for r in records if r["arm"] == "all"]
    assert len(every) == 1
    assert every[0]["clicks"] == 10
    assert every[0]["ndcg"] == pytest.approx(1.0)  # the clicked item was always on top
    assert not np.isnan(every[0]["ctr_low"])


def test_run_exports_the_latest_quality_window_and_its_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One iteration of `recsys monitor run`: the last window's quality, as gauges and as a
    summary (the endpoint is up while it runs; the summary is what is left afterwards)."""
    exposures, outcomes = tmp_path / "exposures", tmp_path / "outcomes"
    writer, events = RotatingFileWriter(exposures), RotatingFileWriter(outcomes)
    now = time.time()
    try:
        for n in range(120):
            ts = now - 100 + n * 0.5
            record = {
                "request_id": f"r{n}", "ts": ts, "user_id": "u", "model_version": "v1",
                "sku_ids": list(range(20)), "scores": [0.0] * 20, "exposures": [],
            }  # fmt: skip
            writer.write_lines([orjson.dumps(record).decode() + "\n"])
            shown = [OutcomeEvent(f"r{n}", "u", s, s, "impression", ts + 0.1) for s in range(20)]
            events.write_lines(encode_events(shown))
        # Events keep coming: every request's late window has closed by the latest one.
        events.write_lines(encode_events([OutcomeEvent("x", "u", 1, 0, "impression", now)]))
    finally:
        writer.close()
        events.close()
    code = main(
        ["monitor", "run", "--artifacts", str(tmp_path), "--exposures", str(exposures),
         "--outcomes", str(outcomes), "--window", "200", "--late-seconds", "1",
         "--metrics-port", "0", "--iterations", "1"]
    )  # fmt: skip
    assert code == 0
    assert "/metrics on 127.0.0.1:" in capsys.readouterr().out
    every = [r for r in iter_summaries(exposures / "monitor", kind="quality") if r["arm"] == "all"]
    assert [(r["requests"], r["impressions"], r["clicks"]) for r in every] == [(120, 2400, 0)]
