from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys.serving.batching import BatcherClosed, BatchStats, MicroBatcher, Overloaded


def square_all(items: list[int]) -> list[int | Exception]:
    return [i * i for i in items]


class Recorder:
    """A batch function that remembers every batch it saw and the thread it ran on."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[int] = set()
        self.stats: list[BatchStats] = []

    def __call__(self, items: list[int]) -> list[int | Exception]:
        self.batches.append(list(items))
        self.threads.add(threading.get_ident())
        return square_all(items)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[int], list[int], int, float, int]:
    items = draw(st.lists(st.integers(-1000, 1000), max_size=60))
    pauses = draw(st.lists(st.integers(0, 3), min_size=len(items), max_size=len(items)))
    max_batch_size = draw(st.integers(1, 16))
    max_delay = draw(st.sampled_from([0.0, 0.0005, 0.002]))
    concurrency = draw(st.integers(1, 3))
    return items, pauses, max_batch_size, max_delay, concurrency


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_every_item_gets_exactly_its_own_result(
    scenario: tuple[list[int], list[int], int, float, int],
) -> None:
    items, pauses, max_batch_size, max_delay, concurrency = scenario
    recorder = Recorder()

    async def submit_after(item: int, pause: int, batcher: MicroBatcher[int, int]) -> int:
        for _ in range(pause):  # interleave submissions with the collector and other callers
            await asyncio.sleep(0)
        return await batcher.submit(item)

    async def run() -> list[int]:
        async with MicroBatcher(
            recorder,
            max_batch_size=max_batch_size,
            max_delay=max_delay,
            max_concurrent_batches=concurrency,
            observer=recorder.stats.append,
        ) as batcher:
            return await asyncio.gather(
                *(submit_after(i, p, batcher) for i, p in zip(items, pauses, strict=True))
            )

    results = asyncio.run(run())
    assert results == [i * i for i in items]
    assert all(1 <= len(b) <= max_batch_size for b in recorder.batches)
    assert sorted(x for b in recorder.batches for x in b) == sorted(items)
    assert sum(s.size for s in recorder.stats) == len(items)
    assert all(len(s.queue_delays) == s.size for s in recorder.stats)
    assert all(d >= 0 for s in recorder.stats for d in s.queue_delays)


async def test_items_are_batched_in_submission_order_off_the_event_loop() -> None:
    recorder = Recorder()
    async with MicroBatcher(recorder, max_batch_size=4, max_delay=0.05) as batcher:
        results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
    assert results == [i * i for i in range(10)]
    assert [x for b in recorder.batches for x in b] == list(range(10))
    assert [len(b) for b in recorder.batches] == [4, 4, 2]
    assert threading.get_ident() not in recorder.threads


async def test_a_per_item_exception_fails_only_that_item() -> None:
    def some_fail(items: list[int]) -> list[int | Exception]:
        return [ValueError(f"item {i} is odd") if i % 2 else i for i in items]

    async with MicroBatcher(some_fail, max_batch_size=8, max_delay=0.01) as batcher:
        outcomes = await asyncio.gather(
            *(batcher.submit(i) for i in range(6)), return_exceptions=True
        )
    assert outcomes[0::2] == [0, 2, 4]
    assert all(
        isinstance(o, ValueError) and f"item {i}" in str(o)
        for i, o in zip(range(1, 6, 2), outcomes[1::2], strict=True)
    )


async def test_a_failing_batch_fails_its_items_and_the_next_batch_still_works() -> None:
    def fails_on_poison(items: list[int]) -> list[int | Exception]:
        if -1 in items:
            raise RuntimeError("model exploded")
        return square_all(items)

    async with MicroBatcher(fails_on_poison, max_batch_size=3, max_delay=0.05) as batcher:
        first = await asyncio.gather(
            *(batcher.submit(i) for i in (1, -1, 2)), return_exceptions=True
        )
        second = await asyncio.gather(*(batcher.submit(i) for i in (3, 4)))
    assert all(isinstance(o, RuntimeError) and "model exploded" in str(o) for o in first)
    assert second == [9, 16]


async def test_a_result_list_of_the_wrong_length_fails_the_batch_clearly() -> None:
    def drops_one(items: list[int]) -> list[int | Exception]:
        return square_all(items)[1:]

    async with MicroBatcher(drops_one, max_batch_size=2, max_delay=0.05) as batcher:
        outcomes = await asyncio.gather(
            *(batcher.submit(i) for i in (1, 2)), return_exceptions=True
        )
    assert all(isinstance(o, RuntimeError) and "1 results for 2 items" in str(o) for o in outcomes)


async def test_a_full_queue_raises_overloaded_and_recovers() -> None:
    release = threading.Event()
    started = threading.Event()

    def blocking(items: list[int]) -> list[int | Exception]:
        started.set()
        release.wait()
        return square_all(items)

    batcher: MicroBatcher[int, int] = MicroBatcher(
        blocking, max_batch_size=1, max_delay=0, max_queue_size=2
    )
    running = asyncio.ensure_future(batcher.submit(1))
    await asyncio.to_thread(started.wait)  # the first batch is in the executor, blocked
    queued = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3)]
    await asyncio.sleep(0)
    with pytest.raises(Overloaded, match="queue is full"):
        await batcher.submit(4)
    release.set()
    assert await running == 1
    assert await asyncio.gather(*queued) == [4, 9]
    assert await batcher.submit(5) == 25
    await batcher.close()


async def test_close_runs_everything_queued_then_refuses_new_items() -> None:
    recorder = Recorder()
    batcher: MicroBatcher[int, int] = MicroBatcher(recorder, max_batch_size=5, max_delay=10.0)
    pending = [asyncio.ensure_future(batcher.submit(i)) for i in range(12)]
    await asyncio.sleep(0)
    await batcher.close()  # does not wait out the 10 s delay
    assert [p.result() for p in pending] == [i * i for i in range(12)]
    with pytest.raises(BatcherClosed, match="closed"):
        await batcher.submit(1)


async def test_a_cancelled_caller_is_left_out_of_its_batch() -> None:
    recorder = Recorder()
    async with MicroBatcher(recorder, max_batch_size=8, max_delay=0.05) as batcher:
        keep = asyncio.ensure_future(batcher.submit(1))
        drop = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0)
        drop.cancel()
        assert await keep == 1
    assert recorder.batches == [[1]]


async def test_a_failing_observer_does_not_fail_requests(caplog: pytest.LogCaptureFixture) -> None:
    def broken(_: BatchStats) -> None:
        raise ValueError("metrics backend down")

    async with MicroBatcher(square_all, max_delay=0, observer=broken, name="obs") as batcher:
        assert await batcher.submit(3) == 9
    assert "batch observer of 'obs' failed" in caplog.text


async def test_each_batch_thread_runs_the_initializer_before_its_first_batch() -> None:
    recorder = Recorder()
    initialized: list[int] = []
    lock = threading.Lock()

    def initialize() -> None:
        with lock:
            initialized.append(threading.get_ident())

    async with MicroBatcher(
        recorder, max_batch_size=2, max_concurrent_batches=2, thread_initializer=initialize
    ) as batcher:
        results = await asyncio.gather(*(batcher.submit(i) for i in range(20)))
    assert results == [i * i for i in range(20)]
    assert recorder.threads <= set(initialized)
    assert len(initialized) == len(set(initialized))  # once per thread


def test_an_initializer_for_an_executor_the_batcher_does_not_own_is_refused() -> None:
    with ThreadPoolExecutor(1) as executor, pytest.raises(ValueError, match="thread_initializer"):
        MicroBatcher(square_all, executor=executor, thread_initializer=lambda: None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_delay": -1.0}, "max_delay"),
        ({"max_queue_size": 0}, "max_queue_size"),
        ({"max_concurrent_batches": 0}, "max_concurrent_batches"),
    ],
)
def test_bad_settings_are_rejected(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MicroBatcher(square_all, **kwargs)  # type: ignore[arg-type]
