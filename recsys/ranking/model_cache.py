"""Model versions loaded for serving, and how long an unneeded one stays loaded.

:class:`ModelCache` loads, validates, compiles and warms each (name, version) once and hands the
same immutable :class:`~recsys.ranking.model.RankingModel` to every snapshot that needs it. A
version that fails validation raises :class:`~recsys.ranking.model.ModelRejected` with its typed
reason; it is never cached and never serves.

:class:`UnloadGrace` decides which versions a new routing no longer needs may stay in the
snapshot a little longer: a client retrying against a just-replaced version still finds it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from recsys.artifacts import ArtifactError, ArtifactRoot
from recsys.ranking.model import ModelRejected, RankingModel
from recsys.ranking.registry import LATENCY_BUDGET_US_PER_ROW, load_for_serving

log = logging.getLogger(__name__)

UNLOAD_GRACE_SECONDS = 30.0
"""How long a version no route or arm needs stays loaded before it is unloaded."""

ModelKey = tuple[str, str]
"""(model name, version)."""


class ModelCache:
    """Loaded model versions by (name, version); thread-safe, loads happen off the event loop."""

    def __init__(
        self,
        root: ArtifactRoot,
        *,
        compile_models: bool = True,
        latency_budget_us: float = LATENCY_BUDGET_US_PER_ROW,
        on_rejected: Callable[[str, str, str], None] | None = None,
        compiled_cache: Path | None = None,
        on_fallback: Callable[[str, str], None] | None = None,
    ) -> None:
        """``compiled_cache``: where compiled models go (default: the root's ``compiled/``);
        ``on_fallback(name, version)``: told when a version scores with LightGBM although
        compilation is on (already logged as a WARNING saying why)."""
        self.root = root
        self.compiled_cache = compiled_cache
        self._on_fallback = on_fallback
        self.compile_models = compile_models
        self.latency_budget_us = latency_budget_us
        self._on_rejected = on_rejected
        self._lock = threading.Lock()
        self._models: dict[ModelKey, RankingModel] = {}

    def get(self, name: str, version: str) -> RankingModel:
        """The loaded, validated, compiled (or LightGBM fallback) and warmed version.

        Raises :class:`ModelRejected` when the version must not serve; unless the version is
        simply absent, that is also logged and reported to ``on_rejected`` with its reason.
        """
        with self._lock:
            cached = self._models.get((name, version))
        if cached is not None:
            return cached
        try:
            directory = self.root.model_dir(name, version)
        except ArtifactError as e:  # a name that cannot be in the registry
            raise ModelRejected(str(e), reason="missing") from e
        if not directory.is_dir():  # not a bad model, so not counted as a rejection
            raise ModelRejected(f"not in the registry ({directory})", reason="missing")
        try:
            model, engine = load_for_serving(
                self.root,
                name,
                version,
                compile_models=self.compile_models,
                latency_budget_us=self.latency_budget_us,
                compiled_cache=self.compiled_cache,
            )
        except ModelRejected as e:
            self._rejected(name, version, e)
            raise
        log.info("model %s/%s loaded and validated; engine %s", name, version, engine)
        if self.compile_models and model.compiled is None and self._on_fallback is not None:
            self._on_fallback(name, version)
        with self._lock:
            self._models[(name, version)] = model
        return model

    def _rejected(self, name: str, version: str, error: ModelRejected) -> None:
        log.error("model %s/%s failed validation and will not serve: %s", name, version, error)
        if self._on_rejected is not None:
            self._on_rejected(name, version, error.reason)

    def loaded(self) -> set[ModelKey]:
        """(name, version) of every model the cache holds."""
        with self._lock:
            return set(self._models)

    def keep_only(self, versions: Iterable[str]) -> None:
        """Release every cached model whose version is not in ``versions``."""
        keep = set(versions)
        with self._lock:
            self._models = {k: m for k, m in self._models.items() if k[1] in keep}


class UnloadGrace:
    """Which versions that left the routing may stay loaded, and for how much longer."""

    def __init__(
        self,
        seconds: float = UNLOAD_GRACE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.seconds = seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._unneeded_since: dict[str, float] = {}

    def kept(
        self, current: Mapping[str, RankingModel], needed: Iterable[str]
    ) -> dict[str, RankingModel]:
        """The versions of ``current`` that are not ``needed`` but still within their grace.

        A version counts from the first time it was found unneeded; one needed again starts
        over the next time it leaves.
        """
        needed = set(needed)
        now = self._clock()
        kept: dict[str, RankingModel] = {}
        with self._lock:
            for version, model in current.items():
                if version in needed:
                    continue
                since = self._unneeded_since.setdefault(version, now)
                if now - since < self.seconds:
                    kept[version] = model
            self._unneeded_since = {
                v: t for v, t in self._unneeded_since.items() if v in kept and v not in needed
            }
        if kept:
            log.info("models kept for the unload grace period: %s", sorted(kept))
        return kept

    def any_expired(self) -> bool:
        """Whether some version kept for its grace has run out of it."""
        now = self._clock()
        with self._lock:
            return any(now - since >= self.seconds for since in self._unneeded_since.values())
