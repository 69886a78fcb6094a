"""Window summaries persisted as JSON lines, so drift can be plotted over time after the fact.

Each line is one (model version, arm) window as :class:`~recsys.monitoring.windows.WindowStats`
saw it: ``{"type": "drift", "v": 1, "ts", "start", "end", "model_version", "arm", "rows",
"requests", "reference_start", "columns": {name: {"psi", "js", "drift_psi", "drift_js",
"nan_share", "out_of_range_share", "live", "expected", "reference"}}}``.
Files are ``drift-YYYYMMDD.jsonl`` (UTC day of the write), 0600 in a 0700 directory, appended.
Quality windows (``recsys monitor quality``) use the same files with ``"type": "quality"``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from recsys.monitoring.windows import WindowStats

PREFIX = "drift-"


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x


def drift_record(stats: WindowStats, ts: float) -> dict[str, Any]:
    return {
        "type": "drift",
        "v": 1,
        "ts": ts,
        "start": stats.start,
        "end": stats.end,
        "model_version": stats.model_version,
        "arm": stats.arm,
        "rows": stats.rows,
        "requests": stats.requests,
        "reference_start": _finite(stats.reference_start),
        "columns": {
            c.name: {
                "psi": _finite(c.psi),
                "js": _finite(c.js),
                "drift_psi": _finite(c.drift_psi),
                "drift_js": _finite(c.drift_js),
                "nan_share": _finite(c.nan_share),
                "out_of_range_share": _finite(c.out_of_range_share),
                "live": list(c.live),
                "expected": list(c.expected),
                "reference": list(c.reference),
            }
            for c in stats.columns
        },
    }


class SummaryLog:
    """Appends summary records to the day's file in ``directory`` (created 0700)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def append(self, records: Iterable[dict[str, Any]], now: float | None = None) -> int:
        lines = [orjson.dumps(r) + b"\n" for r in records]
        if not lines:
            return 0
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        day = time.strftime("%Y%m%d", time.gmtime(time.time() if now is None else now))
        path = self.directory / f"{PREFIX}{day}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "ab") as f:
            f.write(b"".join(lines))
        return len(lines)

    def write_windows(self, stats: Iterable[WindowStats], now: float | None = None) -> int:
        ts = time.time() if now is None else now
        return self.append((drift_record(s, ts) for s in stats), ts)


def iter_summaries(
    directory: Path, *, since: float | None = None, kind: str | None = None
) -> Iterator[dict[str, Any]]:
    """Summary records in ``directory``, oldest file first, optionally from ``since`` (unix
    seconds) and of one ``kind`` ("drift" or "quality"). Unreadable lines are skipped."""
    if not directory.is_dir():
        return
    for path in sorted(directory.glob(f"{PREFIX}*.jsonl")):
        with path.open("rb") as f:
            for line in f:
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(record, dict):
                    continue
                if kind is not None and record.get("type") != kind:
                    continue
                if since is not None and float(record.get("ts", 0.0)) < since:
                    continue
                yield record
