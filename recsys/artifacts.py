"""The artifact root: immutable, content-addressed versions, each with a manifest.

Layout under the root::

    world/<version>/                 demo world arrays (catalogue, users, interaction log)
    features/<version>/              learned user/item vectors and feature tables
    indexes/<version>/               FAISS index over the item vectors
    models/<name>/<version>/         LightGBM ranking models
    control/                         the embedded control plane's documents (file backend)

A version id is the first 12 hex digits of the sha256 over the version's files, so two builds
with the same inputs produce the same ids. Versions are written to a temporary directory and
renamed into place, so a reader never sees half a version.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
VERSION_DIGITS = 12


class ArtifactError(Exception):
    """An artifact is missing, corrupt or does not match its manifest."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file in ``directory`` (recursively), manifest excluded, by relative path."""
    return {
        str(p.relative_to(directory)): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def content_hash(hashes: Mapping[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(hashes):
        digest.update(f"{name}\0{hashes[name]}\n".encode())
    return digest.hexdigest()


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ArtifactError(f"{path}: no manifest; not an artifact version") from e
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: manifest is not valid JSON: {e}") from e
    return manifest


def verify(directory: Path) -> dict[str, Any]:
    """Read the manifest and check every file against its recorded hash."""
    manifest = read_manifest(directory)
    recorded = manifest.get("files", {})
    actual = file_hashes(directory)
    if recorded != actual:
        missing = sorted(set(recorded) - set(actual))
        changed = sorted(k for k in recorded if k in actual and recorded[k] != actual[k])
        extra = sorted(set(actual) - set(recorded))
        raise ArtifactError(
            f"{directory}: files do not match the manifest "
            f"(missing {missing}, changed {changed}, unexpected {extra})"
        )
    return manifest


@contextmanager
def staging(root: Path) -> Iterator[Path]:
    """A temporary directory on the same filesystem as ``root``, removed if not published."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(staged: Path, parent: Path, manifest: Mapping[str, Any]) -> tuple[str, Path]:
    """Hash ``staged``, write its manifest and rename it to ``parent/<version>``.

    Returns ``(version, path)``. Publishing identical content again is a no-op that returns the
    existing version, which keeps versions immutable.
    """
    hashes = file_hashes(staged)
    digest = content_hash(hashes)
    version = digest[:VERSION_DIGITS]
    full = {**manifest, "version": version, "content_hash": digest, "files": hashes}
    (staged / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    parent.mkdir(parents=True, exist_ok=True)
    target = parent / version
    if target.exists():
        return version, target
    try:
        os.rename(staged, target)
    except OSError:
        if not target.exists():
            raise
    staged.mkdir(exist_ok=True)  # staging() removes its directory on exit
    return version, target


def versions(parent: Path) -> list[str]:
    """Published versions under ``parent``, oldest first (by modification time)."""
    if not parent.is_dir():
        return []
    found = [p for p in parent.iterdir() if p.is_dir() and (p / MANIFEST).is_file()]
    return [p.name for p in sorted(found, key=lambda p: (p.stat().st_mtime, p.name))]


class ArtifactRoot:
    """Paths inside one artifact root."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def world(self) -> Path:
        return self.path / "world"

    @property
    def features(self) -> Path:
        return self.path / "features"

    @property
    def indexes(self) -> Path:
        return self.path / "indexes"

    @property
    def control(self) -> Path:
        return self.path / "control"

    def models(self, name: str) -> Path:
        return self.path / "models" / name

    def latest(self, parent: Path) -> Path:
        found = versions(parent)
        if not found:
            raise ArtifactError(f"{parent}: no published version; run `recsys build` first")
        return parent / found[-1]

    def model_versions(self) -> dict[str, list[str]]:
        """Every model name in the registry with its published versions, oldest first."""
        parent = self.path / "models"
        if not parent.is_dir():
            return {}
        return {p.name: versions(p) for p in sorted(parent.iterdir()) if p.is_dir()}

    def lineage(self, index_version: str) -> Lineage:
        """The chain an index version was built from: its features version and their world.

        Raises :class:`ArtifactError` naming the link that is missing or unreadable.
        """
        index_dir = self.indexes / index_version
        features_version = _manifest_field(index_dir, "features_version")
        features_dir = self.features / features_version
        world_version = _manifest_field(features_dir, "world_version")
        return Lineage(
            index_version=index_version,
            features_version=features_version,
            world_version=world_version,
            index_dir=index_dir,
            features_dir=features_dir,
            world_dir=self.world / world_version,
        )


@dataclass(frozen=True)
class Lineage:
    """One index version with the features and world versions it was built from."""

    index_version: str
    features_version: str
    world_version: str
    index_dir: Path
    features_dir: Path
    world_dir: Path


def _manifest_field(directory: Path, key: str) -> str:
    manifest = read_manifest(directory)
    value = manifest.get(key)
    if not isinstance(value, str) or not value:
        raise ArtifactError(f"{directory / MANIFEST}: expected a {key!r} string, got {value!r}")
    return value
