"""Line logs: JSON lines written in batches to rotating files or a Redis Stream, and read back.

The machinery under every append-only record the service keeps (the exposure log, the outcome
events): a :class:`LineWriter` takes whole lines in batches from one writer thread.

- :mod:`recsys.linelog.files`: :class:`~recsys.linelog.files.RotatingFileWriter`,
  ``<prefix>-<pid>-<start ms>-<seq>.jsonl`` in a directory of its own (mode 0700, files 0600),
  rotated by size and age, each closed file gzip-compressed to ``.jsonl.gz``;
- :mod:`recsys.linelog.streams`: :class:`~recsys.linelog.streams.RedisStreamWriter`, one stream
  entry per line (field ``line``), trimmed to about ``maxlen`` entries;
  :class:`~recsys.linelog.streams.StreamArchiver` moves the entries into rotating files with a
  consumer group, acknowledging each only once it is on disk;
- :mod:`recsys.linelog.reading`: :func:`~recsys.linelog.reading.iter_log_lines` reads a
  directory of plain and compressed files back, oldest file first, counting what it had to skip
  (:class:`~recsys.linelog.reading.LineReadStats`).

See docs/exposures.md for the guarantees (what a killed process loses, duplicates, gaps).
"""

from __future__ import annotations

from typing import Protocol


class LineWriter(Protocol):
    """Where log lines go. Called from the sink's writer thread, one batch at a time; every
    line ends with a newline. A batch that cannot be written raises."""

    def write_lines(self, lines: list[str]) -> None: ...

    def close(self) -> None: ...
