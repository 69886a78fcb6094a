"""The control plane's document store: one interface, two backends (a file, Redis).

A document is a JSON object under a name ("experiments", "routing", "availability") with a
version counter. Every write is a compare-and-set on the version the writer read: of two ops
editing at once one wins and the other gets :class:`VersionConflict`, so no update is lost.
Each write appends a history entry (who, when, which paths changed) and notifies watchers
(see watch.py). Validation of a document's content belongs to its owner (e.g.
experiments/config.py); the store checks only that the body is a JSON object.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from recsys import ids

EXPERIMENTS = "experiments"
ROUTING = "routing"
AVAILABILITY = "availability"
DOCUMENTS = (ROUTING, EXPERIMENTS, AVAILABILITY)
"""The documents every server follows (routing first: the snapshot's artifacts hang off it)."""

HISTORY_LIMIT = 1000
"""History entries kept per document (oldest dropped first)."""
MAX_CHANGES = 50
"""Changed paths recorded per history entry."""


class StoreError(Exception):
    """The store cannot serve a request (unreachable backend, corrupt data, bad name)."""


class StoreUnavailable(StoreError):
    """The backend cannot be reached (e.g. Redis is down); callers keep their last good state."""


class StoreForbidden(StoreError):
    """The backend refused the operation to this client's user (a Redis ACL: servers may only
    read the control documents; the ops user writes them)."""


class CorruptDocument(StoreError):
    """The stored document does not parse; ``version`` is the store's version counter for it.

    A write with ``expected_version=version`` replaces it (the compare-and-set still holds).
    """

    def __init__(self, name: str, version: int, source: str, detail: str) -> None:
        self.name = name
        self.version = version
        self.source = source
        self.detail = detail
        super().__init__(
            f"{name}: the stored version {version} is corrupt ({detail}); "
            f"replace it with `recsys control restore {name} VERSION` or a forced write"
        )


class VersionConflict(StoreError):
    """A write expected a version the store no longer has."""

    def __init__(
        self,
        name: str,
        expected: int,
        current: Document | None,
        *,
        corrupt_version: int | None = None,
    ) -> None:
        self.name = name
        self.expected = expected
        self.current = current
        self._corrupt_version = corrupt_version
        actual = self.actual
        if current:
            by = f" (written by {current.author} at {_format_time(current.updated_at)})"
        elif corrupt_version is not None:
            by = " (a corrupt document)"
        else:
            by = " (the document does not exist)"
        super().__init__(
            f"{name}: expected version {expected} but the store has {actual}{by}; "
            "read it again, re-apply your change and retry"
        )

    @property
    def actual(self) -> int:
        if self.current:
            return self.current.version
        return self._corrupt_version or 0


@dataclass(frozen=True)
class Document:
    name: str
    version: int
    body: dict[str, Any]
    author: str
    updated_at: float

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "version": self.version,
                "author": self.author,
                "updated_at": self.updated_at,
                "body": self.body,
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> Document:
        try:
            raw = json.loads(text)
            return cls(
                name=str(raw["name"]),
                version=int(raw["version"]),
                body=dict(raw["body"]),
                author=str(raw["author"]),
                updated_at=float(raw["updated_at"]),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{source}: not a stored document ({e})") from e


@dataclass(frozen=True)
class HistoryEntry:
    name: str
    version: int
    author: str
    updated_at: float
    changes: tuple[str, ...]
    """Paths that changed, e.g. ``~layers[retrieval].experiments[depth].buckets``."""
    body: dict[str, Any] | None = None
    """The full body of this version (None in entries written before bodies were kept), so
    any of the last HISTORY_LIMIT versions can be restored."""

    def to_json(self) -> str:
        raw: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "author": self.author,
            "updated_at": self.updated_at,
            "changes": list(self.changes),
        }
        if self.body is not None:
            raw["body"] = self.body
        return json.dumps(raw, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> HistoryEntry:
        raw = json.loads(text)
        body = raw.get("body")
        return cls(
            name=str(raw["name"]),
            version=int(raw["version"]),
            author=str(raw["author"]),
            updated_at=float(raw["updated_at"]),
            changes=tuple(str(c) for c in raw["changes"]),
            body=dict(body) if isinstance(body, dict) else None,
        )


class DocumentStore(Protocol):
    """Sync API (the CLI; the server calls it through ``asyncio.to_thread``)."""

    url: str

    def read(self, name: str) -> Document | None: ...

    def read_version(self, name: str) -> int:
        """The current version (0 if absent): a cheap check for pollers."""
        ...

    def write(
        self, name: str, body: Mapping[str, Any], *, expected_version: int, author: str
    ) -> Document:
        """Compare-and-set: store ``body`` as version ``expected_version + 1``.

        ``expected_version`` 0 creates the document. Raises :class:`VersionConflict`.
        """
        ...

    def history(self, name: str, limit: int = 20) -> list[HistoryEntry]:
        """Newest first."""
        ...

    def read_raw(self, name: str) -> tuple[int, bytes | None]:
        """The version counter and the stored bytes, unparsed (to inspect a corrupt one)."""
        ...

    def close(self) -> None: ...


def check_name(name: str) -> str:
    """``name`` if it is an id (:func:`recsys.ids.is_id`: it names a file or a Redis key);
    else a StoreError naming it."""
    if not ids.is_id(name):
        raise StoreError(f"document name {name!r}: expected {ids.ID_EXPECTED}")
    return name


def encode_body(name: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """A private JSON copy of ``body`` (so later edits by the caller cannot reach the store)."""
    if not isinstance(body, Mapping):
        raise StoreError(f"{name}: expected a JSON object as the document body, got {type(body)}")
    try:
        copied: dict[str, Any] = json.loads(json.dumps(body, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise StoreError(f"{name}: the document body is not valid JSON ({e})") from e
    return copied


def new_document(
    name: str, body: dict[str, Any], version: int, author: str, now: float | None = None
) -> Document:
    if not author:
        raise StoreError(f"{name}: a write needs an author (who made the change)")
    return Document(name, version, body, author, time.time() if now is None else now)


def history_entry(previous: Document | None, document: Document) -> HistoryEntry:
    before = previous.body if previous else {}
    return HistoryEntry(
        name=document.name,
        version=document.version,
        author=document.author,
        updated_at=document.updated_at,
        changes=summarize_changes(before, document.body),
        body=document.body,
    )


def summarize_changes(before: Any, after: Any, limit: int = MAX_CHANGES) -> tuple[str, ...]:
    """Paths that differ: ``+path`` added, ``-path`` removed, ``~path: old -> new`` changed.

    Lists of objects with a ``name`` are matched by name (``layers[retrieval]``), so inserting an
    experiment does not show every later one as changed.
    """
    found: list[str] = []
    _diff(before, after, "", found)
    if len(found) > limit:
        return (*found[:limit], f"... and {len(found) - limit} more")
    return tuple(found)


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _named(items: Any) -> dict[str, Any] | None:
    if not isinstance(items, list):
        return None
    names = [i.get("name") if isinstance(i, dict) else None for i in items]
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        return None
    return {str(n): i for n, i in zip(names, items, strict=True)}


def _diff(before: Any, after: Any, path: str, out: list[str]) -> None:
    if before == after:
        return
    if isinstance(before, dict) and isinstance(after, dict):
        for key in sorted(set(before) | set(after)):
            p = f"{path}.{key}" if path else str(key)
            if key not in after:
                out.append(f"-{p}")
            elif key not in before:
                out.append(f"+{p}: {_short(after[key])}")
            else:
                _diff(before[key], after[key], p, out)
        return
    old_named, new_named = _named(before), _named(after)
    if old_named is not None and new_named is not None:
        for key in list(old_named) + [k for k in new_named if k not in old_named]:
            p = f"{path}[{key}]"
            if key not in new_named:
                out.append(f"-{p}")
            elif key not in old_named:
                out.append(f"+{p}")
            else:
                _diff(old_named[key], new_named[key], p, out)
        return
    out.append(f"~{path}: {_short(before)} -> {_short(after)}")


def _format_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def check_expected_version(
    store: DocumentStore, name: str, expected_version: int
) -> tuple[Document | None, int]:
    """The stored document of ``name`` (None if absent or corrupt) and its version, if that is
    ``expected_version``; else VersionConflict.

    A corrupt document counts with its version, so an expected-version write can replace it.
    """
    try:
        current = store.read(name)
        version = current.version if current else 0
    except CorruptDocument as e:
        current, version = None, e.version
    if version != expected_version:
        raise VersionConflict(
            name,
            expected_version,
            current,
            corrupt_version=None if current else (version or None),
        )
    return current, version
