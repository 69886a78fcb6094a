"""Reading a directory of line-log files back (plain and compressed), oldest file first,
counting what had to be skipped."""

from __future__ import annotations

import contextlib
import gzip
import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from recsys.linelog.files import _LOG_NAME, _compressed_name

log = logging.getLogger(__name__)


@dataclass
class LineReadStats:
    """What :func:`iter_log_lines` read and what it had to skip."""

    files: int = 0
    records: int = 0
    malformed: int = 0
    """Lines that are not a JSON object (never written by the sink; a damaged or foreign file)."""
    truncated: int = 0
    """A file's last line cut short: a process killed mid-write, or a file still being written."""
    damaged_files: int = 0
    """Compressed files that end early or do not decompress (their readable lines are read)."""

    @property
    def skipped(self) -> int:
        return self.malformed + self.truncated


def log_files(directory: Path) -> list[Path]:
    """Every ``*.jsonl`` and ``*.jsonl.gz`` in ``directory``, oldest first.

    Order: by the writer's start time, process id and sequence number in the name (a writer's
    files in the order written); other names by modification time. A plain file whose
    compressed copy is complete (``.jsonl.gz`` renamed, plain not yet removed) is left out.
    """
    if not directory.is_dir():
        return []
    compressed = {p.name for p in directory.glob("*.jsonl.gz")}
    paths = [
        p
        for p in (*directory.glob("*.jsonl"), *directory.glob("*.jsonl.gz"))
        if p.is_file() and not (p.suffix == ".jsonl" and f"{p.name}.gz" in compressed)
    ]
    return sorted(paths, key=_age_key)


def _age_key(path: Path) -> tuple[int, int, int, str]:
    match = _LOG_NAME.fullmatch(path.name)
    if match is not None:
        seq = match["seq"]
        return int(match["start"]), int(match["pid"]), -1 if seq is None else int(seq), path.name
    with contextlib.suppress(OSError):
        return path.stat().st_mtime_ns // 1_000_000, 0, 0, path.name
    return 0, 0, 0, path.name


def iter_log_lines(
    directory: Path, stats: LineReadStats | None = None, *, modified_since: float | None = None
) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    """``(file, line number, record)`` for every record in ``directory``, oldest file first.

    Lines that do not parse are skipped and counted in ``stats`` (``truncated`` for a last line
    cut short, ``malformed`` otherwise). A plain file compressed between the listing and the
    read is read from its ``.jsonl.gz``. ``modified_since`` (Unix time) skips the files last
    written before it: a record is written after the time it records, so they hold only
    records older than that (a reader of recent records need not open a long archive).
    """
    counts = LineReadStats() if stats is None else stats
    for path in log_files(directory):
        if modified_since is not None and _modified_before(path, modified_since):
            continue
        try:
            source = _open_log(path)
        except FileNotFoundError:
            if path.suffix != ".jsonl":
                continue
            path = _compressed_name(path)
            try:
                source = _open_log(path)
            except FileNotFoundError:
                continue  # removed (retention) since the listing
        counts.files += 1
        with source:
            yield from _read_lines(path, source, counts)


def _modified_before(path: Path, when: float) -> bool:
    try:
        return path.stat().st_mtime < when
    except FileNotFoundError:
        return False  # compressed or removed since the listing: the read copes


def _open_log(path: Path) -> Any:
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _read_lines(
    path: Path, source: Any, counts: LineReadStats
) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    number = 0
    try:
        for raw in source:
            number += 1
            if not raw.strip():
                continue
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                counts.records += 1
                yield path, number, record
            elif raw.endswith(b"\n"):
                counts.malformed += 1
            else:
                counts.truncated += 1
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        counts.damaged_files += 1
        log.warning("log %s: unreadable after line %d (%s)", path, number, e)
