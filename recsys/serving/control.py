"""Follow the control plane: every new document version becomes a new serving snapshot.

One watcher per document (experiments, routing, availability). A new version is compiled into a
snapshot off the event loop and swapped in by reference; a version that does not validate is
counted in a metric and logged, and the previous snapshot keeps serving. Changes are applied one
at a time so two documents changing together cannot overwrite each other's snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from recsys.control.last_good import LastGood
from recsys.control.store import (
    AVAILABILITY,
    DOCUMENTS,
    EXPERIMENTS,
    ROUTING,
    CorruptDocument,
    Document,
    DocumentStore,
    StoreError,
    StoreForbidden,
    StoreUnavailable,
    VersionConflict,
)
from recsys.control.watch import DocumentWatcher, watch
from recsys.pipeline.loading import SnapshotCompiler
from recsys.pipeline.snapshot import ServingSnapshot
from recsys.settings import RedisAuth

from .metrics import ServingMetrics

log = logging.getLogger(__name__)


def read_documents(
    store: DocumentStore, seed_from: DocumentStore | None = None
) -> dict[str, Document]:
    """The current control documents; a missing one is seeded from ``seed_from`` (the artifact
    root's file store) so a fresh Redis starts with what `recsys build` wrote."""
    docs: dict[str, Document] = {}
    for name in DOCUMENTS:
        doc = store.read(name)
        if doc is None and seed_from is not None and (seed := seed_from.read(name)) is not None:
            try:
                store.write(name, seed.body, expected_version=0, author="seed:" + seed.author)
            except VersionConflict:  # another server seeded it first
                pass
            except StoreForbidden as e:  # a read-only server user (the fleet's ACL)
                raise StoreError(
                    f"control plane: no {name} document in the store, and this server may not "
                    f"seed it; publish the documents as the ops user (`recsys control reseed "
                    f"--from DIR`): {e}"
                ) from e
            doc = store.read(name)
        if doc is not None:
            docs[name] = doc
    return docs


def read_start_documents(
    store: DocumentStore, seed_from: DocumentStore | None, last_good: LastGood | None
) -> tuple[dict[str, Document], dict[str, str]]:
    """:func:`read_documents`, falling back to the last good local copies.

    If the store cannot be reached, every document comes from ``last_good``; a corrupt stored
    document is replaced by its last good copy. Returns the documents and, per document taken
    from a local copy, why (logged as a WARNING). With no copy to fall back on, the store's
    error is raised (the server cannot start).
    """
    try:
        return read_documents(store, seed_from), {}
    except StoreUnavailable as e:
        if last_good is None:
            raise
        docs: dict[str, Document] = {}
        for name in DOCUMENTS:
            if (copy := last_good.load(name)) is not None:
                docs[name] = copy
        if not docs:
            raise
        unreachable = {name: f"the store is unreachable ({e})" for name in docs}
        _warn_fallback(docs, unreachable, last_good)
        return docs, unreachable
    except CorruptDocument:
        if last_good is None:
            raise
    # A corrupt document: read the others one by one, and take its last good copy.
    docs = {}
    reasons: dict[str, str] = {}
    for name in DOCUMENTS:
        try:
            doc = store.read(name)
        except CorruptDocument as e:
            if (copy := last_good.load(name)) is None:
                raise
            docs[name] = copy
            reasons[name] = str(e)
            continue
        if doc is None and seed_from is not None and (seed := seed_from.read(name)) is not None:
            with contextlib.suppress(VersionConflict):
                store.write(name, seed.body, expected_version=0, author="seed:" + seed.author)
            doc = store.read(name)
        if doc is not None:
            docs[name] = doc
    _warn_fallback(docs, reasons, last_good)
    return docs, reasons


def last_good_instead(
    docs: Mapping[str, Document], last_good: LastGood, error: Exception
) -> dict[str, str]:
    """The documents (of ``docs``) with a different last good copy, after ``docs`` failed to
    build the initial snapshot with ``error``: name -> reason (logged as WARNING). Empty if
    there is nothing else to try."""
    reasons: dict[str, str] = {}
    replaced: dict[str, Document] = {}
    for name, doc in docs.items():
        try:
            copy = last_good.load(name)
        except StoreError:
            continue
        if copy is not None and (copy.version, copy.body) != (doc.version, doc.body):
            replaced[name] = copy
            reasons[name] = f"the stored version {doc.version} is invalid ({error})"
    _warn_fallback(replaced, reasons, last_good)
    return reasons


def _warn_fallback(
    docs: Mapping[str, Document], reasons: Mapping[str, str], last: LastGood
) -> None:
    for name, reason in reasons.items():
        log.warning(
            "control plane: starting %s from the last good local copy (version %d, %s): %s",
            name, docs[name].version, last.path(name), reason,
        )  # fmt: skip


class ControlFollower:
    """Runs the watchers and applies their documents to the pipeline's snapshot."""

    def __init__(
        self,
        *,
        url: str,
        artifacts: Path,
        prefix: str,
        poll_seconds: float,
        compiler: SnapshotCompiler,
        get_snapshot: Callable[[], ServingSnapshot],
        set_snapshot: Callable[[ServingSnapshot], None],
        metrics: ServingMetrics,
        versions: Mapping[str, int],
        last_good: LastGood | None = None,
        from_last_good: Mapping[str, str] | None = None,
        auth: RedisAuth | None = None,
    ) -> None:
        self._compiler = compiler
        self._last_good = last_good
        self.from_last_good: dict[str, str] = dict(from_last_good or {})
        """Documents served from the local last good copy (until the store gives a new one)."""
        self._get_snapshot = get_snapshot
        self._set_snapshot = set_snapshot
        self._metrics = metrics
        for name in DOCUMENTS:
            metrics.set_control_from_last_good(name, name in self.from_last_good)
        self._apply_lock = asyncio.Lock()
        self.applied: dict[str, int] = dict(versions)
        self._watchers: list[DocumentWatcher] = [
            watch(
                url,
                name,
                artifacts=artifacts,
                prefix=prefix,
                poll_seconds=poll_seconds,
                on_health=partial(metrics.set_control_connected, name),
                # A document from its local copy is followed from scratch: the store's first
                # answer is applied even with the copy's version number (a Redis back with the
                # same versions, or reseeded from these copies), which ends the fallback.
                after_version=0 if name in self.from_last_good else versions.get(name, 0),
                on_rejected=self._rejected,
                auth=auth,
            )
            for name in DOCUMENTS
        ]
        self._tasks: list[asyncio.Task[None]] = []

    def _rejected(self, error: CorruptDocument) -> None:
        """A stored version that does not parse: count it, log it, keep serving."""
        self._metrics.control_document_rejected(error.name)
        log.error(
            "control plane: %s version %d rejected (corrupt), still serving version %d: %s",
            error.name, error.version, self.applied.get(error.name, 0), error,
        )  # fmt: skip

    async def save_last_good(self, document: Document) -> None:
        """Keep ``document`` as the local last good copy (a failure is logged, not raised)."""
        if self._last_good is None:
            return
        try:
            await asyncio.to_thread(self._last_good.save, document)
        except (StoreError, OSError) as e:
            log.warning("control plane: cannot keep the last good copy of %s: %s", document.name, e)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._follow(w), name=f"control-{w.name}") for w in self._watchers
        ]
        self._tasks.append(asyncio.create_task(self._unload_models(), name="model-unload"))

    async def close(self) -> None:
        for watcher in self._watchers:
            await watcher.aclose()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _follow(self, watcher: DocumentWatcher) -> None:
        async for document in watcher:
            await self.apply(document)

    async def _unload_models(self) -> None:
        """Drop model versions no route or arm needs once their grace period has passed.

        Documents already trigger this when they change; this covers a quiet control plane.
        """
        interval = max(0.05, self._compiler.grace.seconds / 4)
        while True:
            await asyncio.sleep(interval)
            async with self._apply_lock:
                try:
                    state = await asyncio.to_thread(
                        self._compiler.unload_expired, self._get_snapshot()
                    )
                except Exception:  # keep serving what is loaded; try again next round
                    log.exception("model unload check failed")
                    continue
                if state is not None:
                    self._set_snapshot(state)
                    log.info("unloaded model versions past their grace period")

    async def apply(self, document: Document) -> bool:
        """Build and swap in the snapshot for ``document``; False if it was rejected."""
        async with self._apply_lock:
            current = self._get_snapshot()
            try:
                state = await asyncio.to_thread(self._compile, current, document)
            except Exception as e:  # any failure keeps the last good snapshot serving
                self._metrics.control_document_rejected(document.name)
                log.error(
                    "control plane: %s version %d rejected, still serving the previous one: %s",
                    document.name, document.version, e,
                )  # fmt: skip
                return False
            self._set_snapshot(state)
            self.applied[document.name] = document.version
            self.from_last_good.pop(document.name, None)
            self._metrics.set_control_from_last_good(document.name, False)
            log.info("control plane: %s version %d applied", document.name, document.version)
            await self.save_last_good(document)
            return True

    def _compile(self, snapshot: ServingSnapshot, document: Document) -> ServingSnapshot:
        body: Mapping[str, Any] = document.body
        if document.name == EXPERIMENTS:
            return self._compiler.with_experiments(snapshot, body, document.version)
        if document.name == ROUTING:
            return self._compiler.with_routing(snapshot, body, document.version)
        if document.name == AVAILABILITY:
            return self._compiler.with_availability(snapshot, body, document.version)
        raise ValueError(f"{document.name}: not a document the server follows")
