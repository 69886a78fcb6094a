"""Micro-batching: requests that arrive together share one FAISS search or one LightGBM predict.

:class:`MicroBatcher` collects submitted items until ``max_batch_size`` items are waiting or
``max_delay`` has passed since the oldest one arrived, then runs the synchronous batch function
in a thread pool (never on the event loop) and resolves each caller with its own result. While
every batch slot is busy, items keep accumulating, so batches grow with load.

Failure isolation: if the batch function raises, every item of that batch gets the exception;
if it returns an ``Exception`` instance in an item's place, only that item raises it.

Admission (``max_queue_delay``) judges the backlog, not one item: a new item is refused at once
(:class:`Overloaded`) when the batches already queued ahead of it would take longer than the
bound to drain at the measured batch time (a moving average), and while more items are queued
than one batch takes, a queued item that has waited twice the bound is answered
:class:`Overloaded` instead of being run, so what is admitted stays bounded. One stalled
batch or a pause of the whole process (a garbage-collection pass) leaves a handful of items
waiting, which the next batch takes at once: no shed. Only a queue longer than the executor
drains within the bound sheds, and then at the door.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Generic, TypeVar

from recsys.thread_names import name_os_thread

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The batch queue is full; the caller should shed the request (RESOURCE_EXHAUSTED)."""


class DeadlineExceeded(Exception):
    """The item's deadline passed before its batch started; nothing was computed for it."""


class BatcherClosed(Overloaded):
    """The batcher is shutting down and accepts no new items."""


@dataclass(frozen=True, slots=True)
class BatchStats:
    """What one batch looked like, reported to the observer after the batch ran."""

    name: str
    size: int
    queue_delays: tuple[float, ...]
    """Seconds each item waited between ``submit`` and the start of the batch function."""
    run_seconds: float


BatchObserver = Callable[[BatchStats], None]


def _ignore(_: BatchStats) -> None:
    return None


BATCH_TIME_WEIGHT = 0.2
"""Weight of the newest batch in the moving average of batch run times."""
EXPIRY_FACTOR = 2.0
"""A queued item that has waited this many times ``max_queue_delay`` is shed, not run."""


@dataclass(slots=True)
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    enqueued: float


def _start_batch_thread(initializer: Callable[[], object] | None) -> None:
    """A batch thread's first act: its name in the operating system (``batch-NAME``), then the
    caller's per-thread settings."""
    name_os_thread()
    if initializer is not None:
        initializer()


class MicroBatcher(Generic[T, R]):
    """Batch ``submit(item)`` calls into ``fn(list[T]) -> list[R | Exception]`` calls.

    Use as an async context manager, or call :meth:`close` to drain and stop. The executor is
    owned (and shut down) by the batcher unless one is passed in; ``thread_initializer`` runs
    once in each of its threads before the first batch there (per-thread library settings).
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R | Exception]],
        *,
        name: str = "batch",
        max_batch_size: int = 32,
        max_delay: float = 0.002,
        max_queue_size: int = 10_000,
        max_queue_delay: float | None = None,
        max_concurrent_batches: int = 1,
        executor: Executor | None = None,
        thread_initializer: Callable[[], object] | None = None,
        observer: BatchObserver = _ignore,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size is {max_batch_size}; expected >= 1")
        if max_delay < 0:
            raise ValueError(f"max_delay is {max_delay}; expected seconds >= 0")
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size is {max_queue_size}; expected >= 1")
        if max_queue_delay is not None and max_queue_delay <= 0:
            raise ValueError(f"max_queue_delay is {max_queue_delay}; expected seconds > 0 or None")
        if max_concurrent_batches < 1:
            raise ValueError(f"max_concurrent_batches is {max_concurrent_batches}; expected >= 1")
        self.name = name
        self._fn = fn
        self._max_batch_size = max_batch_size
        self._max_delay = max_delay
        self._max_queue_size = max_queue_size
        self._max_queue_delay = max_queue_delay
        self._max_concurrent = max_concurrent_batches
        self._owns_executor = executor is None
        if executor is not None and thread_initializer is not None:
            raise ValueError("thread_initializer: only for the batcher's own executor")
        self._executor: Executor = executor or ThreadPoolExecutor(
            max_workers=max_concurrent_batches,
            thread_name_prefix=f"batch-{name}",
            initializer=partial(_start_batch_thread, thread_initializer),
        )
        self._observer = observer
        self._pending: deque[_Pending[T, R]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._collector: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._closing = False
        self._batch_seconds: float | None = None
        """Moving average of the batch function's run time (None until a batch ran)."""
        self.expired = 0
        """Queued items shed because they waited ``EXPIRY_FACTOR`` x ``max_queue_delay``."""

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def predicted_wait(self) -> float:
        """Seconds the backlog ahead of a new item takes to drain: the full batches queued,
        each taking the average batch time, spread over the slots. The batch running now is not
        counted: however long it stalls, the items behind it all fit in the next batch, so a
        stall alone never sheds (that is what the expiry bounds). 0 before a batch ran."""
        if self._batch_seconds is None:
            return 0.0
        rounds = len(self._pending) // self._max_batch_size
        return rounds * self._batch_seconds / self._max_concurrent

    async def submit(self, item: T) -> R:
        """Queue ``item`` and wait for its result.

        Raises :class:`Overloaded` at once when ``max_queue_size`` items wait, or when the
        queue ahead would take longer than ``max_queue_delay`` to drain
        (:meth:`predicted_wait`): work beyond what the batch slots can drain is refused up
        front rather than slowing every request down. An item still queued after
        ``EXPIRY_FACTOR`` x ``max_queue_delay`` raises :class:`Overloaded` too (not run).
        """
        if self._closing:
            raise BatcherClosed(f"batcher {self.name!r} is closed; not accepting items")
        if len(self._pending) >= self._max_queue_size:
            raise Overloaded(
                f"batcher {self.name!r} queue is full ({self._max_queue_size} items waiting)"
            )
        now = time.perf_counter()
        if self._max_queue_delay is not None:
            wait = self.predicted_wait()
            if wait > self._max_queue_delay:
                raise Overloaded(
                    f"batcher {self.name!r} is behind: {len(self._pending)} items queued would "
                    f"take about {wait * 1000:.0f} ms to start "
                    f"(bound {self._max_queue_delay * 1000:.0f} ms)"
                )
        loop = asyncio.get_running_loop()
        if self._collector is None:
            self._wakeup = asyncio.Event()
            self._slots = asyncio.Semaphore(self._max_concurrent)
            self._collector = loop.create_task(self._collect(), name=f"batcher-{self.name}")
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append(_Pending(item, future, now))
        assert self._wakeup is not None
        self._wakeup.set()
        return await future

    async def close(self) -> None:
        """Stop accepting items, run everything already queued, then stop."""
        self._closing = True
        if self._collector is not None:
            assert self._wakeup is not None
            self._wakeup.set()
            await self._collector
        if self._owns_executor:
            self._executor.shutdown(wait=True)

    async def __aenter__(self) -> MicroBatcher[T, R]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _wait_for_item(self, seconds: float | None) -> bool:
        """Wait until something is submitted (or close is called); False after ``seconds``."""
        assert self._wakeup is not None
        self._wakeup.clear()
        try:
            async with asyncio.timeout(seconds):
                await self._wakeup.wait()
        except TimeoutError:
            return False
        return True

    async def _collect(self) -> None:
        assert self._slots is not None
        while True:
            while not self._pending:
                if self._closing:
                    await asyncio.gather(*self._running)
                    return
                await self._wait_for_item(None)
            deadline = self._pending[0].enqueued + self._max_delay
            while len(self._pending) < self._max_batch_size and not self._closing:
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or not await self._wait_for_item(remaining):
                    break
            await self._slots.acquire()
            batch = self._take_batch()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _take_batch(self) -> list[_Pending[T, R]]:
        batch: list[_Pending[T, R]] = []
        # Only a backlog (more queued than one batch takes) expires items: after a stall the few
        # items that waited behind it all run in this batch, late but answered.
        backlogged = len(self._pending) > self._max_batch_size
        expiry = (
            EXPIRY_FACTOR * self._max_queue_delay
            if self._max_queue_delay is not None and backlogged
            else None
        )
        now = time.perf_counter()
        while self._pending and len(batch) < self._max_batch_size:
            pending = self._pending.popleft()
            if pending.future.done():  # the caller may have been cancelled meanwhile
                continue
            if expiry is not None and now - pending.enqueued > expiry:
                self.expired += 1
                pending.future.set_exception(
                    Overloaded(
                        f"batcher {self.name!r} is behind: this item waited more than "
                        f"{expiry * 1000:.0f} ms for a batch"
                    )
                )
                continue
            batch.append(pending)
        return batch

    def _learn_batch_time(self, seconds: float) -> None:
        previous = self._batch_seconds
        self._batch_seconds = (
            seconds if previous is None else previous + BATCH_TIME_WEIGHT * (seconds - previous)
        )

    def _call(self, items: list[T]) -> tuple[Sequence[R | Exception], float, float]:
        started = time.perf_counter()
        results = self._fn(items)
        return results, started, time.perf_counter()

    async def _run(self, batch: list[_Pending[T, R]]) -> None:
        assert self._slots is not None
        loop = asyncio.get_running_loop()
        items = [p.item for p in batch]
        try:
            results, started, finished = await loop.run_in_executor(
                self._executor, self._call, items
            )
            self._learn_batch_time(finished - started)
            if len(results) != len(batch):
                raise RuntimeError(
                    f"batch function of {self.name!r} returned {len(results)} results "
                    f"for {len(batch)} items; expected one result per item"
                )
        except Exception as e:  # the whole batch fails, and only this batch
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(e)
            return
        finally:
            self._slots.release()
        for pending, result in zip(batch, results, strict=True):
            if pending.future.done():
                continue
            if isinstance(result, Exception):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)
        stats = BatchStats(
            name=self.name,
            size=len(batch),
            queue_delays=tuple(started - p.enqueued for p in batch),
            run_seconds=finished - started,
        )
        try:
            self._observer(stats)
        except Exception:  # metering must never break serving
            log.exception("batch observer of %r failed", self.name)
