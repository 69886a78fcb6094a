"""Where serving reads per-user data: one interface, two stores.

A store serves one row per user. In serving that row is the user's whole feature row
(ranking.features.user_feature_rows: the vector the search uses, then the per-user ranking
inputs), so one read per batch gives both stages what they need; the stores themselves are
generic over the row's width and dtype (the local copy's).

- :class:`MmapUserStore` (the default): the features version's ``user_vectors.npy``,
  memory-mapped, so worker processes share one copy in the page cache. A read is one fancy
  index into the array: what serving did before there was an interface.
- :class:`RedisUserStore` (a fleet): one key per user, ``{prefix}{features_version}:uv:{user_id}``
  holding the row's bytes, read for a whole batch with one ``MGET`` (a single round
  trip). When Redis is slow (the socket timeout passes), down, or lacks a user, those rows come
  from the local memory-mapped copy and the read is flagged ``degraded``; after a failure the
  store stops asking Redis for ``retry_seconds`` so an outage does not add a timeout to every
  batch.

The versioned key means a new features version never mixes with the vectors of the previous one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
import redis

from recsys.control.redis_auth import redis_client
from recsys.settings import RedisAuth
from recsys.types import Int64Array

Rows = npt.NDArray[np.floating]
"""[users, width] rows of any float dtype: vectors, or whole user feature rows."""

log = logging.getLogger(__name__)

PUBLISH_CHUNK = 2_000
"""Keys written per pipelined round trip when publishing."""


@dataclass(frozen=True)
class UserVectors:
    vectors: npt.NDArray[np.floating]
    """[B, width] one row per requested user row (the store's rows: vectors or feature rows)."""
    degraded: bool = False
    """True when some rows came from the local fallback copy instead of the online store."""


class UserStore(Protocol):
    def read(self, rows: Int64Array) -> UserVectors:
        """Vectors of user ``rows`` (rows of the features version's user table), in order."""
        ...

    def close(self) -> None: ...


class MmapUserStore:
    """The features version's user vectors, memory-mapped (or any array)."""

    def __init__(self, user_vectors: Rows) -> None:
        self._vectors = user_vectors

    def read(self, rows: Int64Array) -> UserVectors:
        return UserVectors(np.ascontiguousarray(self._vectors[rows], dtype=np.float32))

    def close(self) -> None:
        pass


def user_key(prefix: str, features_version: str, user_id: str) -> str:
    return f"{prefix}{features_version}:uv:{user_id}"


def publish_user_vectors(
    client: redis.Redis,
    prefix: str,
    features_version: str,
    user_ids: npt.NDArray[np.str_],
    user_vectors: Rows,
) -> int:
    """Write every user's vector to Redis (pipelined in chunks); returns the keys written."""
    vectors = np.ascontiguousarray(user_vectors)
    if vectors.ndim != 2 or vectors.shape[0] != user_ids.shape[0]:
        raise ValueError(
            f"user_vectors: expected shape [{user_ids.shape[0]}, d] (one row per user id), "
            f"got {vectors.shape}"
        )
    ids = user_ids.tolist()
    for start in range(0, len(ids), PUBLISH_CHUNK):  # a chunk per round trip, not per user
        pipe = client.pipeline(transaction=False)
        for row in range(start, min(start + PUBLISH_CHUNK, len(ids))):
            pipe.set(user_key(prefix, features_version, ids[row]), vectors[row].tobytes())
        pipe.execute()
    return len(ids)


class RedisUserStore:
    """User vectors from Redis with the memory-mapped copy as the fallback (see module doc)."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        features_version: str,
        user_ids: npt.NDArray[np.str_],
        fallback: Rows,
        *,
        retry_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if fallback.ndim != 2 or fallback.shape[0] != user_ids.shape[0]:
            raise ValueError(
                f"fallback: expected shape [{user_ids.shape[0]}, d] (one row per user id), "
                f"got {fallback.shape}"
            )
        self._client = client
        self._prefix = prefix
        self._keys = np.array(
            [user_key(prefix, features_version, u) for u in user_ids.tolist()], dtype=object
        )
        self._fallback = fallback
        self._row_bytes = int(fallback.shape[1]) * fallback.dtype.itemsize
        self._retry_seconds = retry_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._skip_until = 0.0
        self.failures = 0
        """Reads that fell back because Redis failed (timeouts, connection errors)."""
        self.misses = 0
        """Rows Redis did not have (or held a value of the wrong size)."""

    def read(self, rows: Int64Array) -> UserVectors:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.ascontiguousarray(self._fallback[rows])
        if rows.size == 0:
            return UserVectors(out)
        with self._lock:
            skipping = self._clock() < self._skip_until
        if skipping:
            return UserVectors(out, degraded=True)
        try:
            values = self._client.mget(self._keys[rows].tolist())
        except (redis.RedisError, OSError) as e:
            with self._lock:
                self.failures += 1
                self._skip_until = self._clock() + self._retry_seconds
            log.warning("feature store: Redis read failed, serving the local copy: %s", e)
            return UserVectors(out, degraded=True)
        good = [v if isinstance(v, bytes) and len(v) == self._row_bytes else None for v in values]
        found = [i for i, v in enumerate(good) if v is not None]
        if found:
            joined = b"".join(v for v in good if v is not None)  # one buffer, one numpy view
            out[found] = np.frombuffer(joined, dtype=out.dtype).reshape(len(found), -1)
        missing = len(values) - len(found)
        if missing:
            with self._lock:
                self.misses += missing
        return UserVectors(out, degraded=missing > 0)

    def for_version(
        self, features_version: str, user_ids: npt.NDArray[np.str_], fallback: Rows
    ) -> RedisUserStore:
        """The same Redis (client, prefix, retry policy) for another features version."""
        return RedisUserStore(
            self._client,
            self._prefix,
            features_version,
            user_ids,
            fallback,
            retry_seconds=self._retry_seconds,
            clock=self._clock,
        )

    def close(self) -> None:
        self._client.close()


def open_user_store(
    url: str,
    *,
    prefix: str,
    features_version: str,
    user_ids: npt.NDArray[np.str_],
    user_vectors: Rows,
    timeout_seconds: float = 0.005,
    auth: RedisAuth | None = None,
) -> UserStore:
    """``""``: the memory-mapped store; ``redis://...``: the online store with that fallback."""
    if not url:
        return MmapUserStore(user_vectors)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"feature store URL {url!r}: expected '' (mmap) or redis://HOST:PORT/DB")
    client = redis_client(
        url,
        auth or RedisAuth(),
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
    )
    return RedisUserStore(client, prefix, features_version, user_ids, user_vectors)
