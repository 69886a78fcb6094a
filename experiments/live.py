"""The serving side of the control plane: follow the experiments document, swap one reference.

The server holds a :class:`LiveAssigner` and reads ``live.current`` once per request (no lock:
replacing an attribute is atomic, and an :class:`~experiments.assignment.Assigner` never
changes). :meth:`LiveAssigner.follow` compiles each new version off the event loop; a document
that does not validate is reported and dropped, and the last good snapshot keeps serving.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Collection

from experiments.assignment import Assigner, compile_config
from experiments.config import ConfigError
from recsys.control.store import EXPERIMENTS, Document

EXPERIMENTS_DOCUMENT = EXPERIMENTS


class LiveAssigner:
    def __init__(
        self,
        initial: Assigner,
        *,
        known_model_versions: Collection[str] | None = None,
        on_applied: Callable[[Assigner], None] | None = None,
        on_rejected: Callable[[Document, ConfigError], None] | None = None,
    ) -> None:
        self.current = initial
        self.rejected = 0
        self._known_model_versions = known_model_versions
        self._on_applied = on_applied
        self._on_rejected = on_rejected

    def compile(self, document: Document) -> Assigner:
        """The snapshot of ``document``; raises ConfigError. Pure: safe to run in a thread."""
        return compile_config(
            document.body,
            version=str(document.version),
            known_model_versions=self._known_model_versions,
        )

    def swap(self, assigner: Assigner) -> None:
        self.current = assigner
        if self._on_applied is not None:
            self._on_applied(assigner)

    def reject(self, document: Document, error: ConfigError) -> None:
        self.rejected += 1
        if self._on_rejected is not None:
            self._on_rejected(document, error)

    def apply(self, document: Document) -> bool:
        """Compile ``document`` and swap it in; False (and the old snapshot kept) if invalid."""
        try:
            assigner = self.compile(document)
        except ConfigError as e:
            self.reject(document, e)
            return False
        self.swap(assigner)
        return True

    async def follow(self, documents: AsyncIterator[Document]) -> None:
        """Apply every document ``documents`` yields (e.g. a watcher), compiling in a thread."""
        async for document in documents:
            try:
                assigner = await asyncio.to_thread(self.compile, document)
            except ConfigError as e:
                self.reject(document, e)
                continue
            self.swap(assigner)
