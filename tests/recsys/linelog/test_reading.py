"""Reading line logs back: ``modified_since`` leaves out the files last written before it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from recsys.linelog.reading import LineReadStats, iter_log_lines


def test_files_last_written_before_modified_since_are_not_opened(tmp_path: Path) -> None:
    old, new = tmp_path / "a-old.jsonl", tmp_path / "b-new.jsonl"
    old.write_text(json.dumps({"n": 1}) + "\n")
    new.write_text(json.dumps({"n": 2}) + "\n" + json.dumps({"n": 3}) + "\n")
    os.utime(old, (1_000.0, 1_000.0))
    os.utime(new, (5_000.0, 5_000.0))

    stats = LineReadStats()
    recent = [r["n"] for _p, _n, r in iter_log_lines(tmp_path, stats, modified_since=2_000.0)]
    every = [r["n"] for _p, _n, r in iter_log_lines(tmp_path)]

    assert recent == [2, 3]
    assert stats.files == 1
    assert every == [1, 2, 3]
