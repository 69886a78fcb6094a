"""Follow a document: yield each new version as it appears, without blocking the event loop.

Redis: subscribe to the document's channel first, then read the version counter; a notification
(or, as a fallback, ``poll_seconds`` without one) triggers the next read. If Redis goes away the
watcher reports itself disconnected, keeps the last version it yielded (the caller keeps
serving it) and reconnects with exponential backoff; after reconnecting it reads the counter, so
a write made during the outage is not missed, and the document itself: a version number is only
unique between resets (a Redis that lost its data is reseeded from version 1), so a store that
came back at the same number with another document is followed too.

File: poll the document's version file and (inode, mtime, size) every ``poll_seconds``, in a
thread.

Usage::

    watcher = watch(settings.control, "experiments", artifacts=settings.artifacts,
                    on_health=partial(metrics.set_control_connected, "experiments"))
    async for document in watcher:   # the current document first, then each new version
        ...
    await watcher.aclose()
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections.abc import Callable
from pathlib import Path

import redis
import redis.asyncio as aioredis

from recsys.control.backends import open_store
from recsys.control.file_store import FileStore
from recsys.control.redis_auth import async_redis_client, redacted
from recsys.control.redis_store import DocumentKeys
from recsys.control.store import CorruptDocument, Document, StoreError, check_name
from recsys.settings import DEFAULT_ARTIFACTS, RedisAuth

HealthCallback = Callable[[bool], None]
RejectedCallback = Callable[[CorruptDocument], None]
"""Called once per corrupt stored version (the same bytes seen again are not reported again)."""
INITIAL_BACKOFF_SECONDS = 0.1
MAX_BACKOFF_SECONDS = 5.0


def jittered(backoff: float, rng: random.Random) -> float:
    """A reconnect delay drawn from [backoff / 2, backoff]: a fleet whose Redis comes back does
    not reconnect in one wave (every server started its backoff at the same outage)."""
    return rng.uniform(backoff / 2, backoff)


class DocumentWatcher:
    """An async iterator of new versions of one document; see the module docstring."""

    def __init__(
        self,
        url: str,
        name: str,
        *,
        artifacts: Path,
        prefix: str,
        poll_seconds: float,
        on_health: HealthCallback | None,
        after_version: int,
        max_backoff_seconds: float,
        on_rejected: RejectedCallback | None = None,
        auth: RedisAuth | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if poll_seconds <= 0:
            raise ValueError(f"poll_seconds: expected > 0, got {poll_seconds}")
        self.url = url
        self.name = check_name(name)
        self.poll_seconds = poll_seconds
        self.connected = False
        """False until the backend first answers, and while it is away."""
        self._health_known = False
        self.last_error = ""
        self.outages = 0
        """How many times the backend went away (a counter for metrics)."""
        self._on_health = on_health
        self._on_rejected = on_rejected
        self._rejected: tuple[int, str] | None = None
        self.rejected = 0
        """How many corrupt stored versions were seen (each once)."""
        self._last_version = after_version
        self._last_stamp: tuple[int, float] | None = None
        """(version, updated_at) of the document the caller has, once read; with the version it
        tells a document from another one written at the same number after a reset."""
        self._check_document = True
        """Read the document, not only the counter, at the next read: on each (re)connection."""
        self._max_backoff = max_backoff_seconds
        self._backoff = INITIAL_BACKOFF_SECONDS
        self._rng = rng or random.Random()
        self._auth = auth or RedisAuth()
        self.delays: list[float] = []
        """The last few reconnect delays slept (newest last), for tests and logs."""
        self._closed = False
        self._step: asyncio.Future[Document | None] | None = None
        self._is_redis = url.startswith(("redis://", "rediss://"))
        self._keys = DocumentKeys(prefix, name)
        self._client: aioredis.Redis | None = None
        self._pubsub: aioredis.client.PubSub | None = None
        self._file_store: FileStore | None = None
        self._file_token: tuple[int, int, int, int] | None = None
        if not self._is_redis:
            store = open_store(url, artifacts, prefix=prefix)
            assert isinstance(store, FileStore)
            self._file_store = store

    @property
    def last_version(self) -> int:
        """The version most recently yielded (or ``after_version``)."""
        return self._last_version

    def _set_health(self, connected: bool, error: str = "") -> None:
        if error:
            self.last_error = error
        if connected != self.connected or not self._health_known:
            self._health_known = True
            if not connected:
                self.outages += 1
            self.connected = connected
            if self._on_health is not None:
                self._on_health(connected)

    def _reject(self, error: CorruptDocument, fingerprint: str) -> None:
        """Report a corrupt stored document once; the last good version keeps serving."""
        self.last_error = str(error)
        key = (error.version, fingerprint)
        if key == self._rejected:
            return
        self._rejected = key
        self.rejected += 1
        if self._on_rejected is not None:
            self._on_rejected(error)

    def _is_news(self, document: Document) -> bool:
        """A newer version; or an older one, which means the store was reset (e.g. a Redis that
        lost its data was seeded again): the store's current document is the truth to serve; or
        the caller's version number holding another document (reset, then written up to it)."""
        version, stamp = document.version, (document.version, document.updated_at)
        if version < self._last_version:
            self.last_error = (
                f"{self.name}: the store went back from version {self._last_version} to "
                f"{version} (reset?); following it"
            )
        if version != self._last_version:
            return True
        if self._last_stamp is None:  # the caller's version, seen for the first time
            self._last_stamp = stamp
            return False
        if stamp != self._last_stamp:
            self.last_error = (
                f"{self.name}: version {version} was written again (the store was reset?); "
                "following it"
            )
            return True
        return False

    def __aiter__(self) -> DocumentWatcher:
        return self

    async def __anext__(self) -> Document:
        while not self._closed:
            # Each step runs as a task of ours, so that aclose() can stop it before closing the
            # connections it uses: closed under a running read, redis-py reconnects (and that
            # connection would be left open).
            step = asyncio.ensure_future(
                self._next_redis() if self._is_redis else self._next_file()
            )
            self._step = step
            try:
                document = await step
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if self._closed and (current is None or not current.cancelling()):
                    break  # aclose() stopped the step: the iteration ends
                raise
            finally:
                self._step = None
            if document is not None:
                self._last_version = document.version
                self._last_stamp = (document.version, document.updated_at)
                return document
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop following: end a pending step (the iterator then stops) and close the
        connections."""
        self._closed = True
        step = self._step
        if step is not None and not step.done():
            step.cancel()
            await asyncio.wait([step])
        await self._disconnect()

    # -- file ----------------------------------------------------------------------------------

    async def _next_file(self) -> Document | None:
        store = self._file_store
        assert store is not None
        try:
            token = await asyncio.to_thread(store.change_token, self.name)
            if token != self._file_token:
                try:
                    document = await asyncio.to_thread(store.read, self.name)
                except CorruptDocument as e:  # not an outage: the store answered
                    self._file_token = token
                    self._set_health(True)
                    self._reject(e, repr(token))
                    document = None
                else:
                    self._file_token = token
                    self._set_health(True)
                if document is not None and self._is_news(document):
                    return document
            else:
                self._set_health(True)
        except (StoreError, OSError) as e:
            self._set_health(False, str(e))
        await asyncio.sleep(self.poll_seconds)
        return None

    # -- redis ---------------------------------------------------------------------------------

    async def _next_redis(self) -> Document | None:
        try:
            if self._client is None:
                await self._connect()
            client = self._client
            assert client is not None
            raw_version = await client.get(self._keys.version)
            self._set_health(True)
            self._backoff = INITIAL_BACKOFF_SECONDS
            version = int(raw_version or 0)
            if version != self._last_version or self._check_document:
                # Below the caller's number the store was reset: when the counter is back at it,
                # look at the document again.
                self._check_document = version < self._last_version
                raw = await client.get(self._keys.document)
                if raw is not None:
                    try:
                        document = Document.from_json(
                            raw, f"{redacted(self.url)} {self._keys.document}"
                        )
                    except StoreError as e:
                        corrupt = CorruptDocument(
                            self.name,
                            version,
                            f"{redacted(self.url)} {self._keys.document}",
                            str(e),
                        )
                        self._reject(
                            corrupt,
                            hashlib.sha256(
                                raw if isinstance(raw, bytes) else raw.encode()
                            ).hexdigest(),
                        )
                        raise corrupt from e
                    if self._is_news(document):
                        return document
            await self._wait_for_notification()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            self._set_health(False, f"{redacted(self.url)}: {e}")
            self._check_document = True  # the store may have been reset meanwhile
            await self._disconnect()
            delay = jittered(self._backoff, self._rng)
            self.delays = [*self.delays[-9:], delay]
            await asyncio.sleep(delay)
            self._backoff = min(self._backoff * 2, self._max_backoff)
        except StoreError as e:  # a corrupt document: keep the last good one, look again later
            self.last_error = str(e)
            await asyncio.sleep(self.poll_seconds)
        return None

    async def _connect(self) -> None:
        client = async_redis_client(
            self.url,
            self._auth,
            socket_connect_timeout=2.0,
            socket_timeout=max(2.0, self.poll_seconds + 1.0),
        )
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        self._client, self._pubsub = client, pubsub
        await pubsub.subscribe(self._keys.channel)  # before reading: no write slips between

    async def _wait_for_notification(self) -> None:
        """Until a notification arrives or ``poll_seconds`` pass (the polling fallback)."""
        pubsub = self._pubsub
        assert pubsub is not None
        deadline = time.monotonic() + self.poll_seconds
        while (remaining := deadline - time.monotonic()) > 0:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=remaining)
            if message is not None and message.get("type") == "message":
                return

    async def _disconnect(self) -> None:
        pubsub, client = self._pubsub, self._client
        self._pubsub = self._client = None
        if pubsub is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
        if client is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                await client.aclose()


def watch(
    url: str,
    name: str,
    *,
    artifacts: Path = DEFAULT_ARTIFACTS,
    prefix: str = "recsys:",
    poll_seconds: float = 1.0,
    on_health: HealthCallback | None = None,
    after_version: int = 0,
    max_backoff_seconds: float = MAX_BACKOFF_SECONDS,
    on_rejected: RejectedCallback | None = None,
    auth: RedisAuth | None = None,
) -> DocumentWatcher:
    """Watch document ``name`` in the store at ``url`` ("" = the file in ``artifacts``).

    The first item is the current document (unless its version is ``after_version``), then
    each new version (a version lower than the last one means the store was reset, and is
    yielded too). ``on_health(connected)`` is called when the backend goes away or returns;
    ``on_rejected(error)`` once for each corrupt stored version (the watcher keeps the last
    good one and looks again: a later write replaces the corrupt one). ``auth``: the Redis
    user's password file and CA.
    """
    return DocumentWatcher(
        url,
        name,
        artifacts=artifacts,
        prefix=prefix,
        poll_seconds=poll_seconds,
        on_health=on_health,
        after_version=after_version,
        max_backoff_seconds=max_backoff_seconds,
        on_rejected=on_rejected,
        auth=auth,
    )
