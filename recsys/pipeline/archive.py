"""Snapshot manifests, written once where replay can find them.

Every serving snapshot has an id (a content hash of its manifest, see snapshot.py). The first
time a process serves a snapshot, its manifest goes to ``<directory>/<id>.json``: written to a
temporary file and renamed, mode 0600, never rewritten (the same id is the same content). Replay
reads it back to rebuild exactly what served a logged request.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from recsys.pipeline.snapshot import ServingSnapshot, snapshot_id

log = logging.getLogger(__name__)

SNAPSHOT_ID = re.compile(r"[0-9a-f]{16}")


def snapshot_directory(exposure_dir: Path) -> Path:
    """Where the manifests of the snapshots that wrote to ``exposure_dir`` are kept."""
    return exposure_dir / "snapshots"


class SnapshotArchiveError(Exception):
    """A manifest is missing, unreadable, or does not hash to its id."""


class SnapshotArchive:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, snapshot_id_: str) -> Path:
        if not SNAPSHOT_ID.fullmatch(snapshot_id_):
            raise SnapshotArchiveError(
                f"snapshot id {snapshot_id_!r}: expected 16 lowercase hex digits"
            )
        return self.directory / f"{snapshot_id_}.json"

    def write(self, snapshot: ServingSnapshot) -> Path:
        """Write ``snapshot``'s manifest unless it is already there; returns its path."""
        target = self.path(snapshot.snapshot_id)
        if target.exists():
            return target
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        text = json.dumps(
            {"snapshot_id": snapshot.snapshot_id, **snapshot.manifest()}, sort_keys=True
        )
        fd, tmp = tempfile.mkstemp(prefix=".snapshot-", dir=self.directory)  # mode 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text + "\n")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        log.info("snapshot %s: manifest written to %s", snapshot.snapshot_id, target)
        return target

    def read(self, snapshot_id_: str) -> dict[str, Any]:
        """The manifest of ``snapshot_id_``, checked against its id."""
        path = self.path(snapshot_id_)
        try:
            manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise SnapshotArchiveError(
                f"snapshot {snapshot_id_}: no manifest at {path} (was it served from this log "
                "directory?)"
            ) from e
        except (OSError, json.JSONDecodeError) as e:
            raise SnapshotArchiveError(f"snapshot {snapshot_id_}: cannot read {path}: {e}") from e
        body = {k: v for k, v in manifest.items() if k != "snapshot_id"}
        if snapshot_id(body) != snapshot_id_:
            raise SnapshotArchiveError(
                f"snapshot {snapshot_id_}: {path} does not hash to its id (changed or corrupt)"
            )
        return manifest
