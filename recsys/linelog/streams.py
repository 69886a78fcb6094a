"""Line logs in a Redis Stream: the writer (one entry per line) and the archiver that moves
the entries into rotating files with a consumer group."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from recsys.control.redis_auth import redis_client
from recsys.linelog import LineWriter
from recsys.settings import RedisAuth

log = logging.getLogger(__name__)

STREAM_FIELD = "line"


class RedisStreamWriter:
    """Each line to a Redis Stream entry ``{line: <json>}`` (no trailing newline), one pipelined
    round trip per batch, ``XADD ... MAXLEN ~ maxlen``. A Redis error raises (the sink counts
    it and drops the batch); a dropped connection is retried once on a new one, so a batch in
    flight when Redis restarts may be added twice (records carry their request id)."""

    def __init__(
        self,
        url: str,
        stream: str,
        maxlen: int,
        *,
        timeout_seconds: float = 2.0,
        auth: RedisAuth | None = None,
    ) -> None:
        if not stream:
            raise ValueError("stream key is empty")
        if maxlen < 1:
            raise ValueError(f"stream maxlen is {maxlen}; expected >= 1")
        self.stream = stream
        self.maxlen = maxlen
        self._client = redis_client(
            url,
            auth or RedisAuth(),
            socket_connect_timeout=timeout_seconds,
            socket_timeout=timeout_seconds,
            retry=Retry(NoBackoff(), 1),
        )

    def write_lines(self, lines: Sequence[str]) -> None:
        if not lines:
            return
        pipe = self._client.pipeline(transaction=False)
        for line in lines:
            pipe.xadd(
                self.stream,
                {STREAM_FIELD: line.rstrip("\n")},
                maxlen=self.maxlen,
                approximate=True,
            )
        pipe.execute()

    def close(self) -> None:
        self._client.close()


@dataclass
class ArchiveStats:
    archived: int = 0
    """Entries written to files and acknowledged."""
    skipped: int = 0
    """Entries without a readable ``line`` field (trimmed before they were read, or foreign):
    acknowledged, not written."""
    failed_writes: int = 0
    """Batches the files refused; left pending and read again."""
    trimmed_unread: int = 0
    """Entries ``MAXLEN`` trimmed before the group read them: lost (logged as an error)."""


class StreamArchiver:
    """Moves a stream's entries into rotating files with a consumer group (at least once).

    Each round reads up to ``count`` entries for ``consumer`` (first the ones it was given
    before and never acknowledged, e.g. by a run that crashed; then entries idle longer than
    ``claim_idle_ms`` at other consumers of the group; then new ones), writes them in one batch
    (the writer should fsync) and only then acknowledges them. A crash between the write and
    the acknowledgement writes those entries again on the next run: archives may hold
    duplicates, never gaps (except what ``MAXLEN`` trimmed before it was read).
    """

    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        group: str,
        consumer: str,
        writer: LineWriter,
        *,
        count: int = 1000,
        claim_idle_ms: int = 300_000,
    ) -> None:
        if count < 1:
            raise ValueError(f"archive count is {count}; expected >= 1")
        self._client = client
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self._writer = writer
        self._count = count
        self._claim_idle_ms = claim_idle_ms
        self._own_pending = True
        self._claim_from: str | None = "0-0"
        self._lost_cursor: bytes | None = None
        self._lost_reported = 0
        self.stats = ArchiveStats()

    def create_group(self) -> bool:
        """Create the group at the stream's start (and the stream); False if it exists."""
        try:
            self._client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" in str(e):
                return False
            raise
        return True

    def step(self, block_ms: int | None = None) -> int:
        """One read-write-acknowledge round; returns the entries handled (0: none waiting).

        ``block_ms``: how long to wait for new entries when none are waiting (None: not at all).
        """
        if self._own_pending:
            entries = self._read("0", None)
            if entries:
                return self._archive(entries)
            self._own_pending = False
        if self._claim_from is not None:
            entries = self._claim()
            if entries:
                return self._archive(entries)
        self._check_trimmed()
        return self._archive(self._read(">", block_ms))

    def drain(self) -> ArchiveStats:
        """Archive everything waiting now, then return."""
        self._claim_from = "0-0"
        while self.step(None):
            pass
        return self.stats

    def run(
        self,
        stop: threading.Event,
        *,
        block_ms: int,
        rotate_if_due: Callable[[], None] | None = None,
    ) -> ArchiveStats:
        """Archive until ``stop`` is set (checked at least every ``block_ms``); Redis errors are
        logged and retried with a growing pause (up to 10 s)."""
        pause = 0.5
        claimed_at = time.monotonic()
        while not stop.is_set():
            try:
                if time.monotonic() - claimed_at > self._claim_idle_ms / 1000:
                    self._claim_from, claimed_at = "0-0", time.monotonic()
                self.step(block_ms)
                pause = 0.5
            except redis.ResponseError as e:
                if "NOGROUP" in str(e):  # the stream or group was deleted: start again
                    log.warning("archive: %s; creating group %s again", e, self.group)
                    with contextlib.suppress(redis.RedisError):
                        self.create_group()
                else:
                    log.warning("archive: Redis refused (%s); retrying in %.1fs", e, pause)
                    stop.wait(pause)
                    pause = min(pause * 2, 10.0)
            except redis.RedisError as e:
                log.warning("archive: Redis unavailable (%s); retrying in %.1fs", e, pause)
                stop.wait(pause)
                pause = min(pause * 2, 10.0)
            except OSError:
                log.exception("archive: writing to the archive failed; retrying in %.1fs", pause)
                stop.wait(pause)
                pause = min(pause * 2, 10.0)
            if rotate_if_due is not None:
                rotate_if_due()
        return self.stats

    def _read(self, start: str, block_ms: int | None) -> list[tuple[bytes, Any]]:
        reply: Any = self._client.xreadgroup(
            self.group, self.consumer, {self.stream: start}, count=self._count, block=block_ms
        )
        return list(reply[0][1]) if reply else []  # RESP2: [[stream, [(id, fields), ...]]]

    def _check_trimmed(self) -> None:
        """Count entries trimmed before this group read them (Redis >= 7).

        Every entry ever added was read by the group, is still in the stream after the group's
        last delivered id, or is lost: lost = entries added - entries read - entries after the
        group's cursor, counted once the stream's first entry is past the cursor. Approximate
        under concurrent trimming; skipped where Redis cannot tell (older Redis, XDEL).
        """
        pipe = self._client.pipeline(transaction=False)
        pipe.xinfo_stream(self.stream)
        pipe.xinfo_groups(self.stream)
        try:
            info, groups = pipe.execute()
        except redis.ResponseError:
            return
        group = next((g for g in groups if g.get("name") == self.group.encode()), None)
        added = info.get("entries-added")
        if group is None or added is None:
            return
        cursor = group["last-delivered-id"]
        read = group.get("entries-read")
        if read is None and _entry_id(cursor) != (0, 0):
            return  # a group created past the start: what came before is not ours to count
        first = info.get("first-entry")
        length = int(info.get("length") or 0)
        if length and first and _entry_id(first[0]) <= _entry_id(cursor):
            return  # nothing past the cursor was trimmed
        lost = int(added) - int(read or 0) - length
        if cursor != self._lost_cursor:
            self._lost_cursor, self._lost_reported = cursor, 0
        new = lost - self._lost_reported
        if new > 0:
            self._lost_reported = lost
            self.stats.trimmed_unread += new
            log.error(
                "archive: %d entries of %s were trimmed (MAXLEN) before group %s read them; "
                "they are lost: raise --exposure-stream-maxlen or keep the archiver running",
                new,
                self.stream,
                self.group,
            )

    def _claim(self) -> list[tuple[bytes, Any]]:
        assert self._claim_from is not None
        reply = self._client.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            min_idle_time=self._claim_idle_ms,
            start_id=self._claim_from,
            count=self._count,
        )
        next_id = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        self._claim_from = None if next_id == "0-0" else next_id
        return list(reply[1])

    def _archive(self, entries: list[tuple[bytes, Any]]) -> int:
        if not entries:
            return 0
        lines: list[str] = []
        skipped = 0
        for _entry_id, fields in entries:
            value = fields.get(STREAM_FIELD.encode()) if isinstance(fields, dict) else None
            text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else None
            if text is None or "\n" in text.rstrip("\n"):
                skipped += 1
                continue
            lines.append(text if text.endswith("\n") else text + "\n")
        if lines:
            try:
                self._writer.write_lines(lines)
            except Exception:
                self.stats.failed_writes += 1
                self._own_pending = True  # read again from this consumer's pending entries
                raise
        self._client.xack(self.stream, self.group, *(entry_id for entry_id, _ in entries))
        self.stats.archived += len(lines)
        self.stats.skipped += skipped
        if skipped:
            log.warning("archive: %d entries without a readable line; skipped", skipped)
        return len(entries)


def _entry_id(value: bytes | str) -> tuple[int, int]:
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)
