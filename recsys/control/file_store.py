"""The embedded control plane: documents as files in one directory (the artifact root's control/).

Layout, per document name::

    <name>.json            the current Document (version, author, updated_at, body)
    <name>.version         its version number alone, written after it (cheap to poll)
    <name>.history.jsonl   one HistoryEntry per line, oldest first
    <name>.lock            taken with fcntl.flock around every write

A write takes the lock, re-reads the current version, compares it with the expected one, writes
a temporary file, fsyncs it and renames it over ``<name>.json``: readers (which take no lock)
see the old document or the new one, never half of one. Watchers poll (see watch.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from recsys.control.store import (
    HISTORY_LIMIT,
    CorruptDocument,
    Document,
    HistoryEntry,
    StoreError,
    check_expected_version,
    check_name,
    encode_body,
    history_entry,
    new_document,
)


class FileStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.url = f"file:{directory}"

    def _path(self, name: str, suffix: str) -> Path:
        return self.directory / f"{check_name(name)}{suffix}"

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            lock = open(self._path(name, ".lock"), "a+b")  # noqa: SIM115 (held across yield)
        except OSError as e:
            raise StoreError(f"{self.directory}: cannot write the control directory ({e})") from e
        with lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def read(self, name: str) -> Document | None:
        path = self._path(name, ".json")
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"{path}: cannot read ({e})") from e
        try:
            return Document.from_json(text, str(path))
        except StoreError as e:
            version = self._version_file(name)
            raise CorruptDocument(name, 0 if version is None else version, str(path), str(e)) from e

    def _version_file(self, name: str) -> int | None:
        try:
            return int(self._path(name, ".version").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def read_version(self, name: str) -> int:
        version = self._version_file(name)
        if version is not None:
            return version
        try:
            document = self.read(name)
        except CorruptDocument as e:
            return e.version
        return document.version if document else 0

    def read_raw(self, name: str) -> tuple[int, bytes | None]:
        try:
            raw: bytes | None = self._path(name, ".json").read_bytes()
        except FileNotFoundError:
            raw = None
        except OSError as e:
            raise StoreError(f"{self._path(name, '.json')}: cannot read ({e})") from e
        version = self._version_file(name)
        return (0 if version is None else version), raw

    def change_token(self, name: str) -> tuple[int, int, int, int] | None:
        """Changes whenever a write lands: (version, inode, mtime ns, size) of the document.

        Both signals, because either alone can miss a write: an inode number may be reused
        within one mtime tick, and a crash may land the document but not its version file.
        """
        try:
            st = self._path(name, ".json").stat()
        except FileNotFoundError:
            return None
        return (self.read_version(name), st.st_ino, st.st_mtime_ns, st.st_size)

    def write(
        self, name: str, body: Mapping[str, Any], *, expected_version: int, author: str
    ) -> Document:
        copied = encode_body(name, body)
        with self._locked(name):
            current, version = check_expected_version(self, name, expected_version)
            document = new_document(name, copied, version + 1, author)
            self._replace(self._path(name, ".json"), document.to_json())
            self._replace(self._path(name, ".version"), str(document.version))
            self._append_history(name, history_entry(current, document))
        return document

    def _replace(self, path: Path, text: str) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=self.directory)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _append_history(self, name: str, entry: HistoryEntry) -> None:
        path = self._path(name, ".history.jsonl")
        with path.open("a") as f:
            f.write(entry.to_json() + "\n")
        if entry.version % HISTORY_LIMIT == 0:  # trim now and then, under the write lock
            lines = path.read_text().splitlines()
            if len(lines) > HISTORY_LIMIT:
                self._replace(path, "\n".join(lines[-HISTORY_LIMIT:]) + "\n")

    def history(self, name: str, limit: int = 20) -> list[HistoryEntry]:
        path = self._path(name, ".history.jsonl")
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            return []
        try:
            return [HistoryEntry.from_json(line) for line in reversed(lines[-limit:]) if line]
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{path}: corrupt history ({e})") from e

    def close(self) -> None:
        pass
