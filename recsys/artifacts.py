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

Paths (docs/security.md): every model name and version that becomes a path goes through
:func:`check_id` (the one pattern of recsys/ids.py) and :meth:`ArtifactRoot.inside` (the
resolved path must stay inside the root), so a name like ``../indexes`` can neither read nor
delete anything outside its own directory.

Integrity: a manifest records each file's sha256 (``files``; the version id and content hash are
derived from it) and its xxh3-128 (``files_xxh3``, about 3x faster to check).
:func:`verify` checks the fast hash where one is recorded and sha256 otherwise, so manifests
written before the fast hash existed still verify, and sha256 decides when the two disagree.
xxh3 detects corruption (a flipped bit, a truncated copy), not a forgery: protection against
someone who can write the root is its permissions (:func:`check_not_shared_writable`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import xxhash

from recsys import ids

MANIFEST = "manifest.json"
VERSION_DIGITS = 12
FAST_FILES = "files_xxh3"
"""Manifest field: xxh3-128 of every file, checked at load (``files`` holds the sha256)."""

ID_EXPECTED = f"{ids.ID_EXPECTED} (versions are {VERSION_DIGITS} hex digits)"
"""Model names are chosen by operators (``ranker``); version ids are the first 12 hex digits of
a content hash (:func:`publish`), so every real one matches :data:`recsys.ids.ID_PATTERN`."""
DIRECTORY_MODE = 0o755
"""Directories this module creates: never writable by group or others, whatever the umask."""
_SHARED_WRITE = stat.S_IWGRP | stat.S_IWOTH
_BLOCK = 1 << 20


class ArtifactError(Exception):
    """An artifact is missing, corrupt or does not match its manifest."""


def check_id(value: str, field: str) -> str:
    """``value`` if it is a plain id (:func:`recsys.ids.is_id`); else an ArtifactError naming
    ``field`` ("model name", "index version", ...) and what was expected."""
    if not ids.is_id(value):
        raise ArtifactError(f"{field} {value!r}: expected {ID_EXPECTED}")
    return value


class _Hash(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


def _hash_file(path: Path, make: Callable[[], _Hash]) -> str:
    digest = make()
    buffer = bytearray(_BLOCK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    return _hash_file(path, hashlib.sha256)


def xxh3_file(path: Path) -> str:
    """xxh3-128 of a file: the fast hash :func:`verify` checks at load."""
    return _hash_file(path, xxhash.xxh3_128)


def _files(directory: Path) -> list[Path]:
    return [p for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST]


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file in ``directory`` (recursively), manifest excluded, by relative path."""
    return {str(p.relative_to(directory)): sha256_file(p) for p in _files(directory)}


def fast_file_hashes(directory: Path) -> dict[str, str]:
    """xxh3-128 of every file in ``directory``, like :func:`file_hashes`."""
    return {str(p.relative_to(directory)): xxh3_file(p) for p in _files(directory)}


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
    """Read the manifest and check every file against its recorded hash.

    Each file is checked with its xxh3-128 where the manifest records one (``files_xxh3``) and
    with sha256 otherwise; a file whose fast hash differs is checked with sha256, which decides
    (``files`` is what the version id is derived from). Raises :class:`ArtifactError` naming the
    directory and the missing, changed and unexpected files.
    """
    manifest = read_manifest(directory)
    recorded = manifest.get("files", {})
    fast = manifest.get(FAST_FILES, {})
    if not isinstance(recorded, dict) or not isinstance(fast, dict):
        raise ArtifactError(f"{directory / MANIFEST}: 'files' and {FAST_FILES!r} must be objects")
    if fast and set(fast) != set(recorded):
        raise ArtifactError(
            f"{directory / MANIFEST}: {FAST_FILES} lists other files than 'files' "
            f"({sorted(set(fast) ^ set(recorded))})"
        )
    present = {str(p.relative_to(directory)): p for p in _files(directory)}
    changed = sorted(
        name
        for name, path in present.items()
        if name in recorded
        and not (name in fast and xxh3_file(path) == fast[name])
        and sha256_file(path) != recorded[name]
    )
    missing = sorted(set(recorded) - set(present))
    extra = sorted(set(present) - set(recorded))
    if missing or changed or extra:
        raise ArtifactError(
            f"{directory}: files do not match the manifest "
            f"(missing {missing}, changed {changed}, unexpected {extra})"
        )
    return manifest


def check_not_shared_writable(paths: Iterable[Path], refusing: str) -> None:
    """Raise :class:`ArtifactError` for the first existing path in ``paths`` that group or
    others may write: ``refusing`` says what is refused ("load compiled code from it")."""
    for path in paths:
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            continue
        except OSError as e:
            raise ArtifactError(f"{path}: cannot check its permissions ({e})") from e
        if mode & _SHARED_WRITE:
            raise ArtifactError(
                f"{path} is writable by group or others (mode {stat.S_IMODE(mode):#o}); "
                f"refusing to {refusing}: chmod go-w {path}"
            )


def chain(root: Path, *parts: str) -> list[Path]:
    """``root`` and every directory from it down to ``root/parts[0]/parts[1]/...``."""
    out = [root]
    for part in parts:
        out.append(out[-1] / part)
    return out


def make_directories(path: Path) -> None:
    """``mkdir -p`` whose new directories get :data:`DIRECTORY_MODE` (not group or others
    writable, whatever the umask); existing directories are left as they are."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir(mode=DIRECTORY_MODE, exist_ok=True)


@contextmanager
def staging(root: Path) -> Iterator[Path]:
    """A temporary directory on the same filesystem as ``root``, removed if not published."""
    make_directories(root)
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
    full = {
        **manifest,
        "version": version,
        "content_hash": digest,
        "files": hashes,
        FAST_FILES: fast_file_hashes(staged),
    }
    (staged / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    make_directories(parent)
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
    """Published versions under ``parent``, oldest first (by modification time); directories
    whose names are not ids (staging, a half-retired version) are not versions."""
    if not parent.is_dir():
        return []
    found = [
        p for p in parent.iterdir() if ids.is_id(p.name) and p.is_dir() and (p / MANIFEST).is_file()
    ]
    return [p.name for p in sorted(found, key=lambda p: (p.stat().st_mtime, p.name))]


class ArtifactRoot:
    """Paths inside one artifact root.

    Every method that takes a name or version checks it with :func:`check_id` and the resolved
    path with :meth:`inside`, and raises :class:`ArtifactError` naming the field.
    """

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

    @property
    def compiled(self) -> Path:
        return self.path / "compiled"

    def inside(self, path: Path, what: str) -> Path:
        """``path`` if, resolved (symlinks followed), it lies inside the root; else an error."""
        try:
            resolved = path.resolve()
            root = self.path.resolve()
        except (OSError, RuntimeError, ValueError) as e:
            raise ArtifactError(f"{what} {path}: cannot resolve it ({e})") from e
        if not resolved.is_relative_to(root):
            raise ArtifactError(f"{what} {path}: resolves to {resolved}, outside the artifact root")
        return path

    def models(self, name: str) -> Path:
        """``models/<name>``: every version of one model."""
        check_id(name, "model name")
        return self.inside(self.path / "models" / name, "model name")

    def model_dir(self, name: str, version: str) -> Path:
        """``models/<name>/<version>``."""
        parent = self.models(name)
        check_id(version, "model version")
        return self.inside(parent / version, "model version")

    def compiled_dir(self, name: str, version: str) -> Path:
        """``compiled/<name>/<version>``: cached native code of one model version."""
        check_id(name, "model name")
        check_id(version, "model version")
        return self.inside(self.compiled / name / version, "compiled model")

    def index_dir(self, version: str, field: str = "index version") -> Path:
        return self.inside(self.indexes / check_id(version, field), field)

    def features_dir(self, version: str, field: str = "features version") -> Path:
        return self.inside(self.features / check_id(version, field), field)

    def world_dir(self, version: str, field: str = "world version") -> Path:
        return self.inside(self.world / check_id(version, field), field)

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
        return {
            p.name: versions(p)
            for p in sorted(parent.iterdir())
            if ids.is_id(p.name) and p.is_dir()
        }

    def lineage(self, index_version: str, *, verify_files: bool = True) -> Lineage:
        """The chain an index version was built from: its features version and their world.

        With ``verify_files`` the features and world versions are checked against their
        manifests (:func:`verify`: every file, hashed); the index checks its own files when it
        loads (``ItemIndex.load``). Raises :class:`ArtifactError` naming the link that is
        missing, unreadable, not an id or corrupt.
        """
        index_dir = self.index_dir(index_version)
        features_version = _manifest_field(index_dir, "features_version")
        features_dir = self.features_dir(features_version, "features_version")
        features = verify(features_dir) if verify_files else read_manifest(features_dir)
        world_version = _field(features, features_dir, "world_version")
        world_dir = self.world_dir(world_version, "world_version")
        if verify_files:
            verify(world_dir)
        return Lineage(
            index_version=index_version,
            features_version=features_version,
            world_version=world_version,
            index_dir=index_dir,
            features_dir=features_dir,
            world_dir=world_dir,
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
    return _field(read_manifest(directory), directory, key)


def _field(manifest: Mapping[str, Any], directory: Path, key: str) -> str:
    value = manifest.get(key)
    if not isinstance(value, str) or not value:
        raise ArtifactError(f"{directory / MANIFEST}: expected a {key!r} string, got {value!r}")
    return value
