"""Line logs: JSON lines written in batches to rotating files or a Redis Stream, and read back.

The machinery under every append-only record the service keeps (the exposure log, the outcome
events): a :class:`LineWriter` takes whole lines in batches from one writer thread.

- :class:`RotatingFileWriter`: ``<prefix>-<pid>-<start ms>-<seq>.jsonl`` in a directory of its
  own (mode 0700, files 0600), rotated by size and age, each closed file gzip-compressed to
  ``.jsonl.gz``;
- :class:`RedisStreamWriter`: one stream entry per line (field ``line``), trimmed to about
  ``maxlen`` entries; :class:`StreamArchiver` moves the entries into rotating files with a
  consumer group, acknowledging each only once it is on disk;
- :func:`iter_log_lines` reads a directory of plain and compressed files back, oldest file
  first, counting what it had to skip (:class:`LineReadStats`).

See docs/exposures.md for the guarantees (what a killed process loses, duplicates, gaps).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import gzip
import logging
import os
import re
import shutil
import stat
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from recsys.control.redis_auth import redis_client
from recsys.settings import RedisAuth, ServeSettings

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "exposures"
"""The file name prefix when none is given (the exposure log's; outcome files use their own)."""
_DEFAULTS = ServeSettings()
DIRECTORY_MODE = 0o700
FILE_MODE = 0o600

_LOG_NAME = re.compile(
    r"(?P<prefix>.+?)-(?P<pid>\d+)-(?P<start>\d+)(?:-(?P<seq>\d+))?\.jsonl(?:\.gz)?"
)
"""``<prefix>-<pid>-<start ms>-<seq>.jsonl[.gz]``; logs written before rotation lack ``-<seq>``."""


class LineWriter(Protocol):
    """Where log lines go. Called from the sink's writer thread, one batch at a time; every
    line ends with a newline. A batch that cannot be written raises."""

    def write_lines(self, lines: list[str]) -> None: ...

    def close(self) -> None: ...


# -- rotating files --------------------------------------------------------------------------


def own_directory(directory: Path) -> None:
    """Create ``directory`` (mode 0700), or tighten an existing one to 0700 (logged)."""
    with contextlib.suppress(FileExistsError):
        os.makedirs(directory, mode=DIRECTORY_MODE)
    info = os.stat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise NotADirectoryError(f"log directory {directory} is not a directory")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        try:
            os.chmod(directory, DIRECTORY_MODE)
        except PermissionError:
            log.warning(
                "log directory %s has mode %04o and cannot be tightened (owner uid %d); "
                "its files stay 0600",
                directory,
                mode,
                info.st_uid,
            )
        else:
            log.warning(
                "log directory %s had mode %04o; tightened to %04o",
                directory,
                mode,
                DIRECTORY_MODE,
            )


@dataclass
class _ActiveFile:
    path: Path
    fd: int
    opened: float
    size: int = 0


class RotatingFileWriter:
    """Lines to ``<prefix>-<pid>-<start ms>-<seq>.jsonl`` files in ``directory``.

    - The directory is created mode 0700 (an existing one with wider permissions is tightened,
      and logged); each file is created mode 0600, exclusively (never appended to another's).
    - Each batch goes to the kernel in one ``write`` of whole lines before ``write_lines``
      returns (with ``fsync``, also to the disk), so a killed process loses only what its queue
      still held, and every line on disk parses, but possibly a last one the kernel was
      writing when the process died. A batch that fails half-written (disk full) is cut back
      off the file, which is then closed: a file never has a broken line before its end.
    - A file is rotated once it holds ``max_bytes`` or more, or when a batch (or
      :meth:`rotate_if_due`) comes after it has been open ``max_age_seconds``. The rotated file
      is gzip-compressed to ``.jsonl.gz`` (a ``.part`` file, fsynced and renamed) and the plain
      one removed, in the calling (writer) thread.
    - :meth:`close` flushes (fsync) and closes the active file without compressing it, so that
      stopping stays fast. The writer holds an exclusive ``flock`` on its active file; the
      first batch of the next writer started in the directory compresses the plain files no
      live writer holds (the last file of every stopped or killed process).
    """

    def __init__(
        self,
        directory: Path,
        prefix: str = DEFAULT_PREFIX,
        max_bytes: int = _DEFAULTS.exposure_max_bytes,
        max_age_seconds: float = _DEFAULTS.exposure_max_age_seconds,
        *,
        fsync: bool = False,
        compresslevel: int = 1,
        clock: Callable[[], float] = time.monotonic,
        start: float | None = None,
        pid: int | None = None,
    ) -> None:
        if not prefix or "/" in prefix or os.sep in prefix or prefix.startswith("."):
            raise ValueError(f"log file prefix {prefix!r}: expected a plain file name part")
        if max_bytes < 1:
            raise ValueError(f"log max_bytes is {max_bytes}; expected >= 1")
        if not max_age_seconds > 0:
            raise ValueError(f"log max_age_seconds is {max_age_seconds}; expected > 0")
        if not 0 <= compresslevel <= 9:
            raise ValueError(f"gzip compresslevel is {compresslevel}; expected 0..9")
        own_directory(directory)
        self.directory = directory
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.max_age_seconds = max_age_seconds
        self._fsync = fsync
        self._compresslevel = compresslevel
        self._clock = clock
        self._pid = os.getpid() if pid is None else pid
        self._start_ms = int((time.time() if start is None else start) * 1000)
        self._seq = 0
        self._active: _ActiveFile | None = None
        self._recovered = False

    @property
    def active_path(self) -> Path | None:
        """The file being written now, if any."""
        return None if self._active is None else self._active.path

    def file_name(self, seq: int) -> str:
        return f"{self.prefix}-{self._pid}-{self._start_ms}-{seq}.jsonl"

    def write_lines(self, lines: Sequence[str]) -> None:
        if not self._recovered:
            self._recovered = True
            self.compress_closed_files()
        self.rotate_if_due()
        if not lines:
            return
        data = "".join(lines).encode("utf-8")
        active = self._active or self._open()
        try:
            _write_all(active.fd, data)
            if self._fsync:
                os.fsync(active.fd)
        except OSError:
            self._abandon(active)
            raise
        active.size += len(data)
        if active.size >= self.max_bytes:
            self._rotate()

    def rotate_if_due(self) -> None:
        """Rotate the active file if it has been open ``max_age_seconds`` (the archiver calls
        this while idle; the sink rotates on the next batch)."""
        active = self._active
        if active is not None and self._clock() - active.opened >= self.max_age_seconds:
            self._rotate()

    def close(self) -> None:
        active, self._active = self._active, None
        if active is None:
            return
        try:
            os.fsync(active.fd)
        finally:
            os.close(active.fd)

    def compress_closed_files(self) -> int:
        """Compress this prefix's plain files that no live writer holds; returns how many."""
        done = 0
        for path in sorted(self.directory.glob(f"{glob.escape(self.prefix)}-*.jsonl")):
            if not _LOG_NAME.fullmatch(path.name) or path == self.active_path:
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live writer's active file
                info = os.fstat(fd)
                if info.st_nlink == 0:
                    continue  # compressed by someone else meanwhile
                if info.st_size == 0:
                    continue  # nothing to compress (or a file a writer is about to lock)
                compressed = _compressed_name(path)
                if compressed.exists():  # compressed and renamed before a crash: complete
                    path.unlink()
                else:
                    self._compress(path)
                done += 1
            except OSError:
                log.exception("log %s: compressing a closed file failed; kept plain", path)
            finally:
                os.close(fd)
        if done:
            log.info("log: compressed %d closed files in %s", done, self.directory)
        return done

    def _open(self) -> _ActiveFile:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        while True:
            path = self.directory / self.file_name(self._seq)
            self._seq += 1
            try:
                fd = os.open(path, flags, FILE_MODE)
            except FileExistsError:
                continue
            break
        try:
            # Marks the file as written to. Blocking: a sibling looking for closed files may hold
            # the new, empty file for an instant, and leaves empty files alone.
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
            raise
        self._active = _ActiveFile(path, fd, self._clock())
        return self._active

    def _rotate(self) -> None:
        """Compress the active file while still holding its lock, then close it."""
        active, self._active = self._active, None
        if active is None:
            return
        try:
            self._compress(active.path)
        except Exception:  # the lines are written: a failed compression must not fail a batch
            log.exception("log %s: compression failed; kept plain", active.path)
        finally:
            os.close(active.fd)

    def _abandon(self, active: _ActiveFile) -> None:
        """After a failed write: cut the partial batch off and close the file (complete lines).
        A file the failure left empty is removed (a full disk must not leave one a batch)."""
        if active.size == 0:
            self._active = None
            try:
                active.path.unlink(missing_ok=True)
            finally:
                os.close(active.fd)
            return
        try:
            os.ftruncate(active.fd, active.size)
        except OSError:
            log.exception(
                "log %s: cannot cut a failed batch off; its last line may be partial",
                active.path,
            )
        self._rotate()

    def _compress(self, path: Path) -> Path:
        target = _compressed_name(path)
        part = path.with_name(path.name + ".gz.part")
        info = os.stat(path)
        out = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        try:
            with os.fdopen(out, "wb") as raw:
                with (
                    path.open("rb") as source,
                    gzip.GzipFile(
                        filename=path.name,
                        mode="wb",
                        fileobj=raw,
                        compresslevel=self._compresslevel,
                        mtime=int(info.st_mtime),
                    ) as compressed,
                ):
                    shutil.copyfileobj(source, compressed, 1 << 20)
                raw.flush()
                os.fsync(raw.fileno())
            os.utime(part, ns=(info.st_atime_ns, info.st_mtime_ns))
            os.replace(part, target)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        _fsync_directory(self.directory)
        path.unlink()
        return target


class JsonlFileWriter:
    """Append every batch to one plain file (mode 0600), flushed per batch: for tests and tools.
    The server writes with :class:`RotatingFileWriter`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def write_lines(self, lines: Sequence[str]) -> None:
        if self._fd is None:
            self.path.parent.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
            self._fd = os.open(self.path, flags, FILE_MODE)
        _write_all(self._fd, "".join(lines).encode("utf-8"))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _compressed_name(path: Path) -> Path:
    return path.with_name(path.name + ".gz")


# -- reading ---------------------------------------------------------------------------------


@dataclass
class LineReadStats:
    """What :func:`iter_log_lines` read and what it had to skip."""

    files: int = 0
    records: int = 0
    malformed: int = 0
    """Lines that are not a JSON object (never written by the sink; a damaged or foreign file)."""
    truncated: int = 0
    """A file's last line cut short: a process killed mid-write, or a file still being written."""
    damaged_files: int = 0
    """Compressed files that end early or do not decompress (their readable lines are read)."""

    @property
    def skipped(self) -> int:
        return self.malformed + self.truncated


def log_files(directory: Path) -> list[Path]:
    """Every ``*.jsonl`` and ``*.jsonl.gz`` in ``directory``, oldest first.

    Order: by the writer's start time, process id and sequence number in the name (a writer's
    files in the order written); other names by modification time. A plain file whose
    compressed copy is complete (``.jsonl.gz`` renamed, plain not yet removed) is left out.
    """
    if not directory.is_dir():
        return []
    compressed = {p.name for p in directory.glob("*.jsonl.gz")}
    paths = [
        p
        for p in (*directory.glob("*.jsonl"), *directory.glob("*.jsonl.gz"))
        if p.is_file() and not (p.suffix == ".jsonl" and f"{p.name}.gz" in compressed)
    ]
    return sorted(paths, key=_age_key)


def _age_key(path: Path) -> tuple[int, int, int, str]:
    match = _LOG_NAME.fullmatch(path.name)
    if match is not None:
        seq = match["seq"]
        return int(match["start"]), int(match["pid"]), -1 if seq is None else int(seq), path.name
    with contextlib.suppress(OSError):
        return path.stat().st_mtime_ns // 1_000_000, 0, 0, path.name
    return 0, 0, 0, path.name


def iter_log_lines(
    directory: Path, stats: LineReadStats | None = None, *, modified_since: float | None = None
) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    """``(file, line number, record)`` for every record in ``directory``, oldest file first.

    Lines that do not parse are skipped and counted in ``stats`` (``truncated`` for a last line
    cut short, ``malformed`` otherwise). A plain file compressed between the listing and the
    read is read from its ``.jsonl.gz``. ``modified_since`` (Unix time) skips the files last
    written before it: a record is written after the time it records, so they hold only
    records older than that (a reader of recent records need not open a long archive).
    """
    counts = LineReadStats() if stats is None else stats
    for path in log_files(directory):
        if modified_since is not None and _modified_before(path, modified_since):
            continue
        try:
            source = _open_log(path)
        except FileNotFoundError:
            if path.suffix != ".jsonl":
                continue
            path = _compressed_name(path)
            try:
                source = _open_log(path)
            except FileNotFoundError:
                continue  # removed (retention) since the listing
        counts.files += 1
        with source:
            yield from _read_lines(path, source, counts)


def _modified_before(path: Path, when: float) -> bool:
    try:
        return path.stat().st_mtime < when
    except FileNotFoundError:
        return False  # compressed or removed since the listing: the read copes


def _open_log(path: Path) -> Any:
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _read_lines(
    path: Path, source: Any, counts: LineReadStats
) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    number = 0
    try:
        for raw in source:
            number += 1
            if not raw.strip():
                continue
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                counts.records += 1
                yield path, number, record
            elif raw.endswith(b"\n"):
                counts.malformed += 1
            else:
                counts.truncated += 1
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        counts.damaged_files += 1
        log.warning("log %s: unreadable after line %d (%s)", path, number, e)


# -- Redis Stream ----------------------------------------------------------------------------

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
