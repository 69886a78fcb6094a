"""The controller's lease on a real Redis: one holder at a time, renewed, released, taken over."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from recsys.promotion.lease import RedisLease
from tests.control.redis_helpers import redis_prefix, redis_url

__all__ = ["redis_prefix", "redis_url"]


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def test_one_holder_at_a_time_until_it_lets_go(client: redis.Redis, redis_prefix: str) -> None:
    key = f"{redis_prefix}controller:lease"
    first, second = RedisLease(client, key, 30.0), RedisLease(client, key, 30.0)

    assert first.try_acquire()
    assert not second.try_acquire()
    assert first.try_acquire()  # a renewal
    assert (first.held, second.held) == (True, False)
    assert second.holder() == first.token
    assert 0 < int(client.pttl(key)) <= 30_000

    first.release()
    assert not first.held
    assert second.try_acquire()
    assert client.get(key) == second.token.encode()
    first.release()  # not the holder any more: leaves the key alone
    assert client.get(key) == second.token.encode()


def test_a_lease_that_is_not_renewed_expires(client: redis.Redis, redis_prefix: str) -> None:
    key = f"{redis_prefix}controller:lease"
    crashed, standby = RedisLease(client, key, 0.2), RedisLease(client, key, 30.0)
    assert crashed.try_acquire()
    assert not standby.try_acquire()
    deadline = time.monotonic() + 30.0  # the key expires 0.2 s after the last renewal
    while not standby.try_acquire():
        assert time.monotonic() < deadline, "the lease never expired"
        time.sleep(0.05)
    assert not crashed.try_acquire()
    assert not crashed.held
