"""Where outcome events go: rotating files (0600 files in a 0700 ``outcomes/`` directory) or a
Redis Stream for a fleet, through the exposure log's writers (:mod:`recsys.linelog`).

A stream is archived into files like the exposure stream:
``recsys exposures archive --from URL --stream recsys:outcomes --prefix outcomes --out DIR``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from recsys.linelog import LineWriter
from recsys.linelog.files import RotatingFileWriter
from recsys.linelog.streams import RedisStreamWriter
from recsys.outcomes.events import OutcomeEvent, encode_events
from recsys.settings import RedisAuth

OUTCOME_PREFIX = "outcomes"
DEFAULT_STREAM = "recsys:outcomes"
DEFAULT_STREAM_MAXLEN = 5_000_000
"""About 20 events a request: five times the exposure stream's default length."""


def default_outcome_dir(artifacts: Path) -> Path:
    """``outcomes/`` beside the artifact root (and beside ``exposures/``)."""
    return artifacts.absolute().parent / "outcomes"


def open_outcome_writer(
    *,
    directory: Path | None = None,
    redis_url: str = "",
    stream: str = DEFAULT_STREAM,
    maxlen: int = DEFAULT_STREAM_MAXLEN,
    max_bytes: int = 64 * 1024 * 1024,
    max_age_seconds: float = 3600.0,
    auth: RedisAuth | None = None,
) -> LineWriter:
    """A Redis Stream writer when ``redis_url`` is given (as the ACL user the URL names, with
    ``auth``'s password file), else rotating files in ``directory``."""
    if redis_url:
        return RedisStreamWriter(redis_url, stream, maxlen, auth=auth)
    if directory is None:
        raise ValueError("outcome sink: give a directory or a redis:// URL")
    return RotatingFileWriter(
        directory, OUTCOME_PREFIX, max_bytes=max_bytes, max_age_seconds=max_age_seconds
    )


class OutcomeLog:
    """Writes batches of events to one :class:`LineWriter`; safe to call from several threads
    (one batch at a time), counting what it wrote. Blocking: call it off the event loop."""

    def __init__(self, writer: LineWriter) -> None:
        self._writer = writer
        self._lock = threading.Lock()
        self.written = 0

    def write(self, events: Sequence[OutcomeEvent]) -> None:
        if not events:
            return
        lines = encode_events(events)
        with self._lock:
            self._writer.write_lines(lines)
            self.written += len(lines)

    def close(self) -> None:
        with self._lock:
            self._writer.close()
