"""The exposure log: what each user was shown, by which versions and experiment arms.

:meth:`ExposureSink.record` never waits: it puts the record into a bounded asyncio queue, or
drops and counts it when the queue is full. A background task takes records in batches and
hands them to a :class:`LineWriter` in a dedicated thread (JSON encoding and writes both happen
there). A batch whose write raises is logged (rate-limited), counted as a sink error and its
records as dropped. :meth:`ExposureSink.close` writes everything still queued before returning.

One JSON object per line (:class:`recsys.serving.record.ExposureRecord`). The writers live in
:mod:`recsys.linelog` (shared with the outcome events) and are re-exported here;
:func:`open_exposure_writer` picks one from the settings:

- :class:`RotatingFileWriter` (the default): ``<prefix>-<pid>-<start ms>-<seq>.jsonl`` in a
  directory of its own (mode 0700, files 0600), rotated by size and age, each closed file
  gzip-compressed to ``.jsonl.gz``;
- :class:`RedisStreamWriter`: one stream entry per line (field ``line``), trimmed to about
  ``maxlen`` entries; :class:`StreamArchiver` (``recsys exposures archive``) moves the entries
  into rotating files with a consumer group, acknowledging each only once it is on disk.

:func:`iter_exposure_lines` reads a directory of plain and compressed files back, oldest file
first, counting what it had to skip (:class:`ExposureReadStats`). See docs/exposures.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from recsys.linelog import (
    DEFAULT_PREFIX,
    DIRECTORY_MODE,
    FILE_MODE,
    STREAM_FIELD,
    ArchiveStats,
    JsonlFileWriter,
    LineReadStats,
    LineWriter,
    RedisStreamWriter,
    RotatingFileWriter,
    StreamArchiver,
    iter_log_lines,
    log_files,
    own_directory,
)
from recsys.serving.record import ExposureRecord
from recsys.settings import ServeSettings
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
DRAIN_GATHER_SECONDS = 0.02
"""After a write of fewer than ``max_batch`` records, wait this long for more before handing
the next batch to the writer thread: each hand-off costs the event loop a thread wake-up, and
under load one per few records was ~9% of a cache hit's samples (py-spy). Records reach the
log at most this much later; responses are not delayed."""
"""After a failed write is logged with its traceback, further failures are summed up in one
line at most this often (a Redis outage must not flood the log with one traceback a batch)."""

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
    """Bounded, off-the-hot-path exposure log. ``start`` on the loop, ``close`` to flush."""

    def __init__(
        self,
        writer: LineWriter,
        *,
        queue_size: int = 10_000,
        max_batch: int = 512,
        observer: ExposureObserver | None = None,
    ) -> None:
        if queue_size < 1:
            raise ValueError(f"exposure queue_size is {queue_size}; expected >= 1")
        if max_batch < 1:
            raise ValueError(f"exposure max_batch is {max_batch}; expected >= 1")
        self._writer = writer
        self._queue_size = queue_size
        self._max_batch = max_batch
        self._observer: ExposureObserver = observer or _NullObserver()
        self._queue: asyncio.Queue[ExposureRecord] | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="exposure-writer")
        self._failures = _FailureLog(FAILURE_LOG_INTERVAL_SECONDS)
        self._closed = False

    @property
    def queue_depth(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("exposure sink is already started")
        self._queue = asyncio.Queue(maxsize=self._queue_size)
        self._task = asyncio.get_running_loop().create_task(self._drain(), name="exposure-sink")

    def record(self, request: Request, recommendation: Recommendation) -> bool:
        """Queue one response's record; False (and counted as dropped) if it cannot be queued."""
        if self._queue is None or self._closed:
            self._observer.exposures_dropped(1)
            return False
        try:
            self._queue.put_nowait(ExposureRecord(time.time(), request, recommendation))
        except asyncio.QueueFull:
            self._observer.exposures_dropped(1)
            return False
        return True

    async def close(self) -> None:
        """Write every queued record, then stop the writer and close it (errors are logged and
        counted, never raised: the server's stop goes on)."""
        self._closed = True
        if self._queue is not None and self._task is not None:
            await self._queue.join()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._thread, self._writer.close)
        except Exception:
            log.exception("exposure log: closing the writer failed")
            self._observer.exposure_sink_errors(1)
        self._thread.shutdown(wait=True)

    def _write(self, batch: list[ExposureRecord]) -> None:
        self._writer.write_lines([record.to_json() for record in batch])

    async def _drain(self) -> None:
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            while len(batch) < self._max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                await loop.run_in_executor(self._thread, self._write, batch)
            except Exception as e:
                self._observer.exposure_sink_errors(1)
                self._observer.exposures_dropped(len(batch))
                self._failures.failed(len(batch), e)
            else:
                self._observer.exposures_written(len(batch))
                self._failures.succeeded()
            finally:
                for _ in batch:
                    queue.task_done()
            if len(batch) < self._max_batch and not self._closed:
                await asyncio.sleep(DRAIN_GATHER_SECONDS)
