"""A server's local copy of the last good version of each control document.

One file per document, ``<directory>/<name>.json``, in the same format as the file store's
``<name>.json`` (a stored Document), mode 0600, replaced atomically. A server writes it each
time a version is applied; at start, if the store is unreachable or its document corrupt, it
starts from these copies instead of exiting. ``recsys control reseed --from DIR`` writes them
back into a store that lost its data (a Redis restarted without persistence).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from recsys.control.store import Document, StoreError, check_name

LAST_GOOD_DIRECTORY = "control-last-good"
"""Under the server's exposure directory (its writable directory)."""


class LastGood:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, name: str) -> Path:
        return self.directory / f"{check_name(name)}.json"

    def save(self, document: Document) -> None:
        """Write ``document`` as the last good copy (StoreError if the directory is unwritable)."""
        path = self.path(document.name)
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=self.directory)
        except OSError as e:
            raise StoreError(f"{self.directory}: cannot keep the last good copy ({e})") from e
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(document.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def load(self, name: str) -> Document | None:
        """The last good copy of ``name``; None if there is none (StoreError if it is corrupt)."""
        path = self.path(name)
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"{path}: cannot read ({e})") from e
        return Document.from_json(text, str(path))
