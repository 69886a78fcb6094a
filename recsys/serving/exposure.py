"""The exposure log: what each user was shown, by which versions and experiment arms.

:meth:`ExposureSink.record` never waits: it puts the record into a bounded asyncio queue, or
drops and counts it when the queue is full. A background task takes records in batches and
hands them to a :class:`LineWriter` in a dedicated thread (JSON encoding and file writes both
happen there). :meth:`ExposureSink.close` writes everything still queued before returning.

One JSON object per line (:class:`recsys.serving.record.ExposureRecord`), in
``<artifacts>/exposures/exposures-<pid>-<start>.jsonl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Protocol

from recsys.serving.record import ExposureRecord
from recsys.types import Recommendation, Request

log = logging.getLogger(__name__)

EXPOSURES_DIR = "exposures"


class ExposureObserver(Protocol):
    def exposures_written(self, count: int) -> None: ...

    def exposures_dropped(self, count: int) -> None: ...


class LineWriter(Protocol):
    """Where exposure lines go. Called from the sink's writer thread, one batch at a time."""

    def write_lines(self, lines: list[str]) -> None: ...

    def close(self) -> None: ...


class JsonlFileWriter:
    """Append lines to a file, flushing after every batch."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def write_lines(self, lines: list[str]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write("".join(lines))
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def exposure_log_path(
    artifacts: Path, *, pid: int | None = None, start: float | None = None
) -> Path:
    """``<artifacts>/exposures/exposures-<pid>-<start ms>.jsonl``: one file per server process."""
    pid = os.getpid() if pid is None else pid
    start_ms = int((time.time() if start is None else start) * 1000)
    return artifacts / EXPOSURES_DIR / f"exposures-{pid}-{start_ms}.jsonl"


class _NullObserver:
    def exposures_written(self, count: int) -> None:
        return None

    def exposures_dropped(self, count: int) -> None:
        return None


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
        """Write every queued record, then stop the writer and close the file."""
        self._closed = True
        if self._queue is not None and self._task is not None:
            await self._queue.join()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self._writer.close)
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
            except Exception:
                log.exception("exposure log write failed; %d records dropped", len(batch))
                self._observer.exposures_dropped(len(batch))
            else:
                self._observer.exposures_written(len(batch))
            finally:
                for _ in batch:
                    queue.task_done()
