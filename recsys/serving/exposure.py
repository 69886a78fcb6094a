"""The exposure log: what each user was shown, by which versions and experiment arms.

:meth:`ExposureSink.record` never waits: it puts the record into a bounded queue, or drops
and counts it when the queue is full. A writer thread of the sink's own takes records in
batches and hands them to a :class:`LineWriter` (JSON encoding and writes both happen there).
A batch whose write raises is logged (rate-limited), counted as a sink error and its records
as dropped. :meth:`ExposureSink.close` writes everything still queued before returning.

One JSON object per line (:class:`recsys.serving.record.ExposureRecord`). The writers live in
:mod:`recsys.linelog` (shared with the outcome events) and are re-exported here;
:func:`open_exposure_writer` picks one from the settings:

- :class:`RotatingFileWriter` (the default): ``<prefix>-<pid>-<start ms>-<seq>.jsonl`` in a
  directory of its own (mode 0700, files 0600), rotated by size and age, each closed file
  gzip-compressed to ``.jsonl.gz`` in a thread of its own at the lowest CPU priority;
- :class:`RedisStreamWriter`: one stream entry per line (field ``line``), trimmed to about
  ``maxlen`` entries; :class:`StreamArchiver` (``recsys exposures archive``) moves the entries
  into rotating files with a consumer group, acknowledging each only once it is on disk.

:func:`iter_exposure_lines` reads a directory of plain and compressed files back, oldest file
first, counting what it had to skip (:class:`ExposureReadStats`). See docs/exposures.md.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from queue import Empty
from typing import Protocol

from recsys.linelog import LineWriter
from recsys.linelog.files import (
    DEFAULT_PREFIX,
    DIRECTORY_MODE,
    FILE_MODE,
    JsonlFileWriter,
    RotatingFileWriter,
    own_directory,
)
from recsys.linelog.reading import LineReadStats, iter_log_lines, log_files
from recsys.linelog.streams import STREAM_FIELD, ArchiveStats, RedisStreamWriter, StreamArchiver
from recsys.serving.record import ExposureRecord
from recsys.settings import ServeSettings
from recsys.thread_names import name_os_thread
from recsys.types import Recommendation, Request

__all__ = [
    "DEFAULT_PREFIX",
    "DIRECTORY_MODE",
    "FILE_MODE",
    "STREAM_FIELD",
    "ArchiveStats",
    "ExposureObserver",
    "ExposureReadStats",
    "ExposureSink",
    "JsonlFileWriter",
    "LineWriter",
    "RedisStreamWriter",
    "RotatingFileWriter",
    "StreamArchiver",
    "exposure_log_files",
    "iter_exposure_lines",
    "open_exposure_writer",
    "own_directory",
]

log = logging.getLogger(__name__)

FAILURE_LOG_INTERVAL_SECONDS = 60.0
"""After a failed write is logged with its traceback, further failures are summed up in one
line at most this often (a Redis outage must not flood the log with one traceback a batch)."""
DRAIN_GATHER_SECONDS = 0.02
"""Woken by a record after its queue was empty, the writer thread waits this long for more
before taking a batch: one wake-up (and one ``write``) per batch instead of per few records.
Records reach the log at most this much later; responses are not delayed."""

ExposureReadStats = LineReadStats
exposure_log_files = log_files
iter_exposure_lines = iter_log_lines


class ExposureObserver(Protocol):
    def exposures_written(self, count: int) -> None: ...

    def exposures_dropped(self, count: int) -> None: ...

    def exposure_sink_errors(self, count: int) -> None: ...


# -- the sink --------------------------------------------------------------------------------


def open_exposure_writer(settings: ServeSettings) -> LineWriter:
    """The writer the settings name: a Redis Stream, or rotating files in the exposure dir."""
    if settings.exposure_sink:
        return RedisStreamWriter(
            settings.exposure_sink,
            settings.exposure_stream,
            settings.exposure_stream_maxlen,
            auth=settings.redis_auth,
        )
    return RotatingFileWriter(
        settings.exposure_path,
        max_bytes=settings.exposure_max_bytes,
        max_age_seconds=settings.exposure_max_age_seconds,
        compress_in_background=True,
    )


class _NullObserver:
    def exposures_written(self, count: int) -> None:
        return None

    def exposures_dropped(self, count: int) -> None:
        return None

    def exposure_sink_errors(self, count: int) -> None:
        return None


class _FailureLog:
    """The first failure with its traceback, then one summary line per interval."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._logged_at: float | None = None
        self._failures = 0
        self._records = 0

    def failed(self, records: int, error: BaseException) -> None:
        now = self._clock()
        if self._logged_at is None:
            log.error("exposure log write failed; %d records dropped", records, exc_info=error)
            self._logged_at = now
            return
        self._failures += 1
        self._records += records
        if now - self._logged_at >= self._interval:
            self._summary(f"last error: {error!r}")
            self._logged_at = now

    def succeeded(self) -> None:
        if self._logged_at is None:
            return
        if self._failures:
            self._summary("writes succeed again")
        else:
            log.warning("exposure log writes succeed again")
        self._logged_at = None

    def _summary(self, tail: str) -> None:
        log.error(
            "exposure log write failed %d more times (%d records dropped); %s",
            self._failures,
            self._records,
            tail,
        )
        self._failures = self._records = 0


class ExposureSink:
    """Bounded, off-the-hot-path exposure log: a writer thread of its own, ``start`` it, then
    ``close`` it on the event loop to flush.

    The request path only puts the record into a :class:`queue.SimpleQueue` (no event-loop work
    per record or per batch): the thread sleeps in ``get`` while nothing is queued, so a put
    wakes it only when the queue was empty; it then gathers for
    :data:`DRAIN_GATHER_SECONDS`, takes up to ``max_batch`` records, encodes and writes them,
    and takes the next batch at once while a full one was waiting.
    """

    def __init__(
        self,
        writer: LineWriter,
        *,
        queue_size: int = 10_000,
        max_batch: int = 512,
        observer: ExposureObserver | None = None,
        gather_seconds: float = DRAIN_GATHER_SECONDS,
    ) -> None:
        if queue_size < 1:
            raise ValueError(f"exposure queue_size is {queue_size}; expected >= 1")
        if max_batch < 1:
            raise ValueError(f"exposure max_batch is {max_batch}; expected >= 1")
        self._writer = writer
        self._queue_size = queue_size
        self._max_batch = max_batch
        self._gather_seconds = gather_seconds
        self._observer: ExposureObserver = observer or _NullObserver()
        self._queue: queue.SimpleQueue[ExposureRecord | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._failures = _FailureLog(FAILURE_LOG_INTERVAL_SECONDS)
        self._closed = False

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("exposure sink is already started")
        self._thread = threading.Thread(target=self._run, name="exposure-writer", daemon=True)
        self._thread.start()

    def record(self, request: Request, recommendation: Recommendation) -> bool:
        """Queue one response's record; False (and counted as dropped) if it cannot be queued."""
        if self._thread is None or self._closed or self._queue.qsize() >= self._queue_size:
            self._observer.exposures_dropped(1)
            return False
        self._queue.put(ExposureRecord(time.time(), request, recommendation))
        return True

    async def close(self) -> None:
        """Write every queued record, then close the writer (errors are logged and counted,
        never raised: the server's stop goes on)."""
        self._closed = True  # records from now on are refused: none comes after the stop mark
        thread = self._thread
        if thread is None:
            await asyncio.to_thread(self._close_writer)
            return
        self._queue.put(None)  # the stop mark: the thread writes what precedes it, then stops
        await asyncio.to_thread(thread.join)

    def _run(self) -> None:
        name_os_thread()
        pending = self._queue
        full = False
        while True:
            batch = [pending.get()]  # asleep while nothing is queued
            if batch[0] is not None and not full and not self._closed:
                time.sleep(self._gather_seconds)  # one wake-up per batch, not per record
            while batch[-1] is not None and len(batch) < self._max_batch:
                try:
                    batch.append(pending.get_nowait())
                except Empty:
                    break
            stop = batch[-1] is None
            records = [record for record in batch if record is not None]
            full = len(records) >= self._max_batch
            if records:
                self._write(records)
            if stop:
                self._close_writer()
                return

    def _write(self, batch: list[ExposureRecord]) -> None:
        try:
            self._writer.write_lines([record.to_json() for record in batch])
        except Exception as e:
            self._observer.exposure_sink_errors(1)
            self._observer.exposures_dropped(len(batch))
            self._failures.failed(len(batch), e)
        else:
            self._observer.exposures_written(len(batch))
            self._failures.succeeded()

    def _close_writer(self) -> None:
        try:
            self._writer.close()
        except Exception:
            log.exception("exposure log: closing the writer failed")
            self._observer.exposure_sink_errors(1)
