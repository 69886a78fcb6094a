"""Reconnect backoff with jitter: a fleet does not reconnect to a returning Redis in one wave."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from recsys.control.watch import INITIAL_BACKOFF_SECONDS, jittered, watch
from tests.control.redis_helpers import free_port


def test_jittered_delays_spread_over_the_upper_half_of_the_backoff() -> None:
    rng = random.Random(5)
    delays = [jittered(2.0, rng) for _ in range(1000)]
    assert all(1.0 <= d <= 2.0 for d in delays)
    assert max(delays) - min(delays) > 0.8  # spread, not one value


async def test_two_watchers_of_an_unreachable_redis_wait_different_delays(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    watchers = [
        watch(url, "routing", artifacts=tmp_path, poll_seconds=1.0, max_backoff_seconds=0.4)
        for _ in range(2)
    ]
    steps = [asyncio.ensure_future(anext(w)) for w in watchers]
    try:
        for _ in range(400):  # bounded: until each has slept three times
            if all(len(w.delays) >= 3 for w in watchers):
                break
            await asyncio.sleep(0.01)
    finally:
        for w in watchers:
            await w.aclose()
        await asyncio.gather(*steps, return_exceptions=True)
    first, second = (w.delays[:3] for w in watchers)
    assert first != second
    assert all(INITIAL_BACKOFF_SECONDS / 2 <= d <= 0.4 for d in first + second)
    assert first[0] <= INITIAL_BACKOFF_SECONDS
