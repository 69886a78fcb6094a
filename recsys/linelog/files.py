"""Rotating line-log files: one writer's ``<prefix>-<pid>-<start ms>-<seq>.jsonl`` files in a
directory of its own (0700, files 0600), rotated by size and age, each closed file
gzip-compressed to ``.jsonl.gz`` (in the writer's thread, or in a thread of its own at the
lowest CPU priority); and a plain one-file writer for tests and tools."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import gzip
import logging
import os
import re
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from recsys import ids
from recsys.settings import ServeSettings
from recsys.thread_names import name_os_thread

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "exposures"
"""The file name prefix when none is given (the exposure log's; outcome files use their own)."""
_DEFAULTS = ServeSettings()
DIRECTORY_MODE = 0o700
FILE_MODE = 0o600

BACKGROUND_NICE = 19
"""Niceness of the thread that compresses closed files in the background (Linux's lowest CPU
priority): it gets the CPU the serving threads leave, and gives it back the moment one of them
wakes. Compressing a 64 MiB file at gzip level 1 takes about a second of CPU; in the serving
threads' way it stalled a worker for that long at every rotation (benchmarks/README.md,
"Twentieth round")."""
BACKLOG_WARNING = 4
"""Closed files waiting for background compression at which the writer logs a warning (and at
every doubling after): the worker has had too little idle CPU to keep up. They stay plain and
readable meanwhile."""
CHUNK_BYTES = 1 << 20
"""Bytes compressed between two checks of a stop request."""

_LOG_NAME = re.compile(
    r"(?P<prefix>.+?)-(?P<pid>\d+)-(?P<start>\d+)(?:-(?P<seq>\d+))?\.jsonl(?:\.gz)?"
)
"""``<prefix>-<pid>-<start ms>-<seq>.jsonl[.gz]``; logs written before rotation lack ``-<seq>``."""


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
    """Lines to ``<prefix>-<pid>-<start ms>-<seq>.jsonl`` files in ``directory``; ``prefix`` is
    an id (:func:`recsys.ids.is_id`), so no file lands outside ``directory``.

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
      one removed: in the calling (writer) thread, or with ``compress_in_background`` in a
      thread of the writer's own at the lowest CPU priority (:data:`BACKGROUND_NICE` on
      Linux), which keeps the file's lock until its compressed copy is in place; the writer
      thread goes on writing the next file at once. A serving process compresses in the
      background: its requests come first, the compression takes the CPU they leave.
    - :meth:`close` flushes (fsync) and closes the active file without compressing it, so that
      stopping stays fast; a background compression under way stops within one
      :data:`CHUNK_BYTES` chunk and leaves its file plain. The writer holds an exclusive
      ``flock`` on its active file (and on each file waiting for compression); the first batch
      of the next writer started in the directory compresses the plain files no live writer
      holds (the last file of every stopped or killed process).
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
        compress_in_background: bool = False,
        clock: Callable[[], float] = time.monotonic,
        start: float | None = None,
        pid: int | None = None,
    ) -> None:
        if not ids.is_id(prefix):
            raise ValueError(f"log file prefix {prefix!r}: expected {ids.ID_EXPECTED}")
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
        self._compressor = _Compressor(self) if compress_in_background else None

    @property
    def active_path(self) -> Path | None:
        """The file being written now, if any."""
        return None if self._active is None else self._active.path

    def file_name(self, seq: int) -> str:
        return f"{self.prefix}-{self._pid}-{self._start_ms}-{seq}.jsonl"

    def write_lines(self, lines: Sequence[str]) -> None:
        if not self._recovered:
            self._recovered = True
            if self._compressor is None:
                self.compress_closed_files()
            else:
                self._compressor.submit(None)
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
        try:
            if active is not None:
                try:
                    os.fsync(active.fd)
                finally:
                    os.close(active.fd)
        finally:
            if self._compressor is not None:
                self._compressor.close()

    def wait_compressed(self, timeout: float | None = None) -> bool:
        """Wait until no closed file waits for background compression; False on timeout. (True
        at once when compressing in the writer's thread: nothing is ever left waiting.)"""
        return self._compressor is None or self._compressor.wait_idle(timeout)

    def compress_closed_files(self, stop: threading.Event | None = None) -> int:
        """Compress this prefix's plain files that no live writer holds; returns how many.
        ``stop``: give up between two chunks once it is set (the file stays plain)."""
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
                    self._compress(path, stop)
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
        """Compress the active file while still holding its lock, then close it (or hand both
        to the background compressor)."""
        active, self._active = self._active, None
        if active is None:
            return
        if self._compressor is not None:
            self._compressor.submit(active)
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

    def _compress(self, path: Path, stop: threading.Event | None = None) -> Path:
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
                    while chunk := source.read(CHUNK_BYTES):
                        if stop is not None and stop.is_set():
                            raise CompressionStopped(f"log {path}: compression stopped; kept plain")
                        compressed.write(chunk)
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


class CompressionStopped(Exception):
    """A background compression gave up because its writer is closing; the file stays plain."""


class _Compressor:
    """A :class:`RotatingFileWriter`'s background compression: one thread (``log-compress`` in
    the operating system), started on first use, at :data:`BACKGROUND_NICE`, taking closed
    files one at a time. A queued file's descriptor, and so its lock, is the compressor's until
    the file is compressed (or, at close, left plain)."""

    def __init__(self, writer: RotatingFileWriter) -> None:
        self._writer = writer
        self._jobs: deque[_ActiveFile | None] = deque()
        """Closed files to compress; None: the plain files no live writer holds."""
        self._busy = False
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, job: _ActiveFile | None) -> None:
        with self._changed:
            if self._stop.is_set():  # closing: the file stays plain for the next writer
                if job is not None:
                    os.close(job.fd)
                return
            self._jobs.append(job)
            waiting = len(self._jobs)
            self._changed.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="log-compress", daemon=True)
                self._thread.start()
        if waiting >= BACKLOG_WARNING and waiting & (waiting - 1) == 0:
            log.warning(
                "log %s: %d closed files wait for compression (the process has had little idle "
                "CPU); they stay plain and readable meanwhile",
                self._writer.directory,
                waiting,
            )

    def wait_idle(self, timeout: float | None) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: not self._jobs and not self._busy, timeout)

    def close(self) -> None:
        """Stop: the file under way stays plain (within one chunk), so do the queued ones; every
        lock is let go, so the next writer in the directory compresses them."""
        with self._changed:
            self._stop.set()
            self._changed.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._changed:
            while self._jobs:
                job = self._jobs.popleft()
                if job is not None:
                    os.close(job.fd)
            self._changed.notify_all()

    def _run(self) -> None:
        name_os_thread()
        _lowest_priority()
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._jobs) or self._stop.is_set())
                if self._stop.is_set():
                    return
                job = self._jobs.popleft()
                self._busy = True
            try:
                self._one(job)
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()

    def _one(self, job: _ActiveFile | None) -> None:
        try:
            if job is None:
                self._writer.compress_closed_files(self._stop)
            else:
                self._writer._compress(job.path, self._stop)
        except CompressionStopped:
            pass
        except Exception:  # the lines are written: a failed compression must not stop logging
            where = self._writer.directory if job is None else job.path
            log.exception("log %s: compression failed; kept plain", where)
        finally:
            if job is not None:
                os.close(job.fd)


def _lowest_priority() -> None:
    """The calling thread to :data:`BACKGROUND_NICE` (Linux, where niceness is per thread;
    elsewhere the call would lower the whole process, so it is left alone)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except OSError as e:
        log.warning("log compression thread: cannot lower its CPU priority (%s)", e)


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
