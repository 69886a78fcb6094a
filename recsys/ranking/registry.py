"""The model registry: immutable versions on disk, routing in the control plane.

Versions live under the artifact root (``models/<name>/<version>/``, see ranking/model.py); which
of them serve is the ``routing`` document in the control store (a file or Redis). Every routing
change is validated first (the version loads, matches the feature schema, reproduces its golden
scores, scores no NaN and fits the latency budget) and written with the version it read, so two
operators cannot overwrite each other. What a server does with the new document is in
serving/state.py; both sides run the same :func:`load_for_serving`.

Roles of a version: ``production``, ``canary`` (a share of users by hash), ``previous`` (the
production before the last promotion, kept loaded for an instant rollback) and ``pinned`` by an
experiment arm (``model_version`` in the experiments document). A version with any role cannot be
retired.

Every name and version an operation is given is checked (``artifacts.check_id``, the resolved
path inside the root) before it touches the disk, and models are registered only into a root
that group and others cannot write (docs/security.md).
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from recsys.artifacts import (
    ArtifactError,
    ArtifactRoot,
    chain,
    check_not_shared_writable,
    read_manifest,
    verify,
    versions,
)
from recsys.control.store import ROUTING, Document, DocumentStore, StoreError
from recsys.ranking.compiled import CompileError
from recsys.ranking.evaluation import distribution_baseline
from recsys.ranking.features import CATEGORICAL_FEATURES, FEATURE_NAMES, load_feature_tables
from recsys.ranking.model import (
    ModelRejected,
    RankingModel,
    load_model_version,
    parse_booster,
    save_model_version,
)
from recsys.ranking.routing import ModelRoute, RoutingError, RoutingTable, arm_pins, parse_routing
from recsys.ranking.training import (
    RankerParams,
    TrainedRanker,
    offline_metrics,
    train_ranker,
    training_splits,
)
from recsys.world import load_world

log = logging.getLogger(__name__)

EXPERIMENTS = "experiments"
WARMUP_ROWS = 500
LATENCY_BUDGET_US_PER_ROW = 200.0
"""Scoring budget per row, measured on a warm-up batch of WARMUP_ROWS rows (best of three). The
served ranker takes a few µs per row; the budget stops a model tens of times too big, not noise."""


DECISIONS_FILE = "decisions.jsonl"


def _with_note(what: str, note: str) -> str:
    return f"{what} ({note})" if note else what


def _plain(value: Any) -> Any:
    """``value`` as plain JSON: numpy scalars as numbers, NaN and infinities as null."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RegistryError(Exception):
    """An operation on the registry cannot be done; the message says why and what to do."""


# -- loading for serving -------------------------------------------------------------------------


def load_for_serving(
    root: ArtifactRoot,
    name: str,
    version: str,
    *,
    compile_models: bool = True,
    latency_budget_us: float = LATENCY_BUDGET_US_PER_ROW,
    compiled_cache: Path | None = None,
) -> tuple[RankingModel, str]:
    """Load, validate, compile (or fall back to LightGBM) and warm up one version.

    ``compiled_cache``: where compiled code is cached (default: the root's ``compiled/``).

    Returns the model and a note on its engine (why it fell back, if it did). Raises
    :class:`ModelRejected` naming the reason when the version must not serve. A fallback to
    LightGBM (the compiled engine unavailable, a cache others can write, a damaged binary) is
    logged as a WARNING saying why.
    """
    model = load_model_version(root, name, version)
    note = "lightgbm (compilation off)"
    if compile_models:
        try:
            model = model.with_compiled(compiled_cache or root.compiled)
            note = f"lleaves ({model.compiled.binary.name if model.compiled else ''})"
        except CompileError as e:
            note = f"lightgbm (compiled engine unavailable: {e})"
            log.warning("model %s/%s scores with LightGBM: %s", name, version, e)
    check_latency(model, latency_budget_us)
    return model, note


def warmup_rows(model: RankingModel, rows: int = WARMUP_ROWS) -> np.ndarray:
    golden = np.asarray(model.manifest["golden"]["features"], dtype=np.float32)
    return np.ascontiguousarray(np.resize(golden, (rows, golden.shape[1])))


def check_latency(model: RankingModel, budget_us_per_row: float) -> float:
    """µs per row on a warm-up batch (best of three runs); raises if over the budget or NaN."""
    batch = warmup_rows(model)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        scores = model.predict(batch)
        best = min(best, time.perf_counter() - start)
        if np.isnan(scores).any():
            raise ModelRejected(
                f"model {model.name}/{model.version}: scores NaN on the warm-up batch", reason="nan"
            )
    per_row = float(best / batch.shape[0] * 1e6)
    if per_row > budget_us_per_row:
        raise ModelRejected(
            f"model {model.name}/{model.version}: {per_row:.1f} µs per row on a warm-up batch of "
            f"{batch.shape[0]} rows ({model.engine}), over the budget of {budget_us_per_row:g} µs",
            reason="latency",
        )
    return per_row


# -- the registry --------------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    created_at: float
    num_trees: int
    metrics: dict[str, float]
    roles: tuple[str, ...]


class ModelRegistry:
    """Versions of ranking models in ``root`` and their routing in ``store``."""

    def __init__(
        self,
        root: ArtifactRoot,
        store: DocumentStore,
        *,
        author: str = "ops",
        latency_budget_us: float = LATENCY_BUDGET_US_PER_ROW,
        compile_models: bool = True,
    ) -> None:
        self.root = root
        self.store = store
        self.author = author
        self.latency_budget_us = latency_budget_us
        self.compile_models = compile_models

    # reading

    def names(self) -> list[str]:
        return sorted(self.root.model_versions())

    def known_versions(self) -> dict[str, list[str]]:
        return self.root.model_versions()

    def routing(self) -> tuple[RoutingTable, int]:
        document = self._read(ROUTING)
        if document is None:
            raise RegistryError(
                f"the control plane ({self.store.url}) has no routing document: `recsys build` "
                "writes one; a store that lost its documents (a Redis restarted without "
                "persistence) gets them back with `recsys control reseed --from DIR`"
            )
        try:
            return parse_routing(document.body), document.version
        except RoutingError as e:
            raise RegistryError(f"stored routing version {document.version} is invalid: {e}") from e

    def roles(self, name: str) -> dict[str, list[str]]:
        """Version -> its roles (production, canary 5%, previous, pinned by exp/arm)."""
        found: dict[str, list[str]] = {}
        try:
            table, _ = self.routing()
        except RegistryError:
            table = None
        route = table.models.get(name) if table else None
        if route is not None:
            found.setdefault(route.production, []).append("production")
            if route.canary:
                found.setdefault(route.canary, []).append(f"canary {route.canary_percent:g}%")
            if route.previous:
                found.setdefault(route.previous, []).append("previous")
        experiments = self._read(EXPERIMENTS)
        pins = arm_pins(experiments.body).get(name, {}) if experiments else {}
        for version, arms in pins.items():
            found.setdefault(version, []).extend(f"pinned by {a}" for a in sorted(arms))
        return found

    def list(self, name: str) -> list[VersionInfo]:
        parent = self._model_parent(name)
        roles = self.roles(name)
        out = []
        for version in versions(parent):
            directory = parent / version
            manifest = read_manifest(directory)
            out.append(
                VersionInfo(
                    name=name,
                    version=version,
                    created_at=(directory / "manifest.json").stat().st_mtime,
                    num_trees=int(manifest.get("num_trees", 0)),
                    metrics=dict(manifest.get("metrics", {})),
                    roles=tuple(roles.get(version, ())),
                )
            )
        return out

    def manifest(self, name: str, version: str) -> dict[str, Any]:
        directory = self._version_dir(name, version)
        try:
            return read_manifest(directory)
        except ArtifactError as e:
            raise RegistryError(str(e)) from e

    # writing versions

    def validate(self, name: str, version: str) -> tuple[RankingModel, str]:
        """:func:`load_for_serving`, with its refusal as a :class:`RegistryError`."""
        self._version_dir(name, version)
        try:
            return load_for_serving(
                self.root,
                name,
                version,
                compile_models=self.compile_models,
                latency_budget_us=self.latency_budget_us,
            )
        except ModelRejected as e:
            raise RegistryError(
                f"{name}/{version} failed validation and will not serve: {e}"
            ) from e

    def train(self, name: str, seed: int | None = None) -> str:
        """Train a version on the world behind the served index, register and validate it."""
        self.check_registrable(name)
        world, tables, features_version, world_version = self._serving_inputs()
        params = RankerParams() if seed is None else RankerParams(seed=seed)
        trained = train_ranker(world, tables, params)
        version = save_model_version(
            self.root,
            name,
            trained,
            tables,
            features_version=features_version,
            world_version=world_version,
            params=params,
        )
        self.validate(name, version)
        return version

    def register(self, name: str, model_file: Path) -> str:
        """Register a LightGBM text model trained elsewhere; refuse a corrupt or unfit one.

        Golden rows, the drift baseline and offline metrics come from the world behind the
        served index (the data the model will score); the training-data fingerprint records that
        the training data is unknown here.
        """
        self.check_registrable(name)
        try:
            text = model_file.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise RegistryError(f"--model-file {model_file}: cannot read it as text ({e})") from e
        try:
            booster = parse_booster(text)
        except Exception as e:  # LightGBMError and friends: not a model
            raise RegistryError(
                f"--model-file {model_file}: not a LightGBM text model ({e})"
            ) from e
        if list(booster.feature_name()) != list(FEATURE_NAMES):
            raise RegistryError(
                f"--model-file {model_file}: incompatible feature schema: the model uses "
                f"{booster.feature_name()}, the feature pipeline produces {list(FEATURE_NAMES)}"
            )
        world, tables, features_version, world_version = self._serving_inputs()
        params = RankerParams()
        splits = training_splits(world, tables, params)
        rows = splits["train"].features
        rng = np.random.default_rng(params.seed)
        golden = rows[
            np.sort(rng.choice(rows.shape[0], size=min(64, rows.shape[0]), replace=False))
        ]
        sample = rows[
            np.sort(rng.choice(rows.shape[0], size=min(200_000, rows.shape[0]), replace=False))
        ]
        scores = np.asarray(booster.predict(sample, num_threads=1))
        if np.isnan(scores).any():
            raise RegistryError(f"--model-file {model_file}: the model scores NaN on served data")
        trained = TrainedRanker(
            booster=booster,
            metrics=offline_metrics(booster, splits["eval"], params),
            feature_importance={},
            train_fingerprint="external:" + hashlib.sha256(text.encode()).hexdigest(),
            golden_features=np.ascontiguousarray(golden),
            baseline=distribution_baseline(
                sample, scores, names=FEATURE_NAMES, categorical=CATEGORICAL_FEATURES
            ),
            params=params,
        )
        try:
            version = save_model_version(
                self.root,
                name,
                trained,
                tables,
                features_version=features_version,
                world_version=world_version,
                params=None,
            )
        except (ValueError, ArtifactError) as e:
            raise RegistryError(str(e)) from e
        self.validate(name, version)
        return version

    def check_registrable(self, name: str) -> None:
        """Refuse a model name that is not an id, or a root (``models/``, ``models/<name>``)
        that group or others can write: whoever can write there could swap the model."""
        parent = self._model_parent(name)
        try:
            check_not_shared_writable(
                chain(self.root.path, "models", parent.name), "register a model into it"
            )
        except ArtifactError as e:
            raise RegistryError(str(e)) from e

    def retire(self, name: str, version: str) -> None:
        """Delete a version no route or arm uses (and its compiled binaries)."""
        directory = self._version_dir(name, version)
        roles = self.roles(name).get(version)
        if roles:
            raise RegistryError(
                f"{name}/{version} is still routed ({', '.join(roles)}); promote, roll back or "
                "unpin it first"
            )
        # Rename first: listings never see a half-deleted version.
        compiled = self._checked(lambda: self.root.compiled_dir(name, version))
        doomed = directory.with_name(f".retired-{version}-{time.time_ns()}")
        directory.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        shutil.rmtree(compiled, ignore_errors=True)

    # the decision history

    def record_decision(self, name: str, record: Mapping[str, Any]) -> dict[str, Any]:
        """Append a decision record (a gate verdict, a forced promotion, a canary step) to
        ``models/<name>/decisions.jsonl`` (0600), stamped with the time and author. Routing
        changes stay in the control store's history; this is the evidence behind them."""
        parent = self._model_parent(name)
        entry = _plain({"ts": time.time(), "author": self.author, **record})
        line = json.dumps(entry, sort_keys=True, allow_nan=False) + "\n"
        parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(parent / DECISIONS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        return dict(entry)

    def decisions(self, name: str, limit: int = 20) -> builtins.list[dict[str, Any]]:
        """Decision records of ``name``, newest first."""
        path = self._model_parent(name) / DECISIONS_FILE
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            return []
        out: builtins.list[dict[str, Any]] = []
        for line in reversed(lines):
            if len(out) >= limit:
                break
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
        return out

    # writing routing

    def promote(self, name: str, version: str, *, note: str = "") -> Document:
        """Route all of ``name``'s traffic to ``version``; the old production becomes previous.

        ``note`` goes into the routing history after the action (``forced past failed gates:
        ...``, the decision that made the change)."""
        self.validate(name, version)
        table, _ = self.routing()
        route = table.models.get(name)
        if route is None:
            new = ModelRoute(production=version)
        elif route.production == version:
            raise RegistryError(f"{name}/{version} is already the production version")
        else:
            canary = route.canary if route.canary != version else ""
            new = ModelRoute(
                production=version,
                canary=canary,
                canary_percent=route.canary_percent if canary else 0.0,
                previous=route.production,
            )
        return self._write_route(name, new, _with_note(f"promote {name}/{version}", note))

    def canary(self, name: str, version: str, percent: float, *, note: str = "") -> Document:
        """Send ``percent`` of users (by hash) to ``version``; 0 ends the canary."""
        if not 0 <= percent <= 100:
            raise RegistryError(f"--percent {percent}: expected a number in [0, 100]")
        self._model_parent(name)
        if percent != 0:
            self._checked(lambda: self.root.model_dir(name, version))
        table, _ = self.routing()
        route = table.models.get(name)
        if route is None:
            raise RegistryError(f"{name}: no production version to canary against; promote one")
        if percent == 0:
            return self._write_route(
                name, replace(route, canary="", canary_percent=0.0), _with_note("canary off", note)
            )
        if version == route.production:
            raise RegistryError(f"{name}/{version} is the production version; canary another")
        self.validate(name, version)
        new = replace(route, canary=version, canary_percent=float(percent))
        return self._write_route(
            name, new, _with_note(f"canary {name}/{version} {percent:g}%", note)
        )

    def rollback(self, name: str, *, note: str = "") -> Document:
        """Production back to the previous version (already loaded: a pointer flip)."""
        self._model_parent(name)
        table, _ = self.routing()
        route = table.models.get(name)
        if route is None or not route.previous:
            raise RegistryError(f"{name}: no previous production version to roll back to")
        previous_version = route.previous
        previous = self._checked(lambda: self.root.model_dir(name, previous_version))
        if not previous.is_dir():
            raise RegistryError(f"{name}/{route.previous}: the previous version is not on disk")
        canary = route.canary if route.canary != route.previous else ""
        new = ModelRoute(
            production=route.previous,
            canary=canary,
            canary_percent=route.canary_percent if canary else 0.0,
            previous=route.production,
        )
        return self._write_route(
            name, new, _with_note(f"rollback {name} to {route.previous}", note)
        )

    # plumbing

    @staticmethod
    def _checked(path: Callable[[], Path]) -> Path:
        """``path()``, its ArtifactError (a name or version that is not an id) a RegistryError."""
        try:
            return path()
        except ArtifactError as e:
            raise RegistryError(str(e)) from e

    def _model_parent(self, name: str) -> Path:
        return self._checked(lambda: self.root.models(name))

    def _version_dir(self, name: str, version: str) -> Path:
        directory = self._checked(lambda: self.root.model_dir(name, version))
        if not (directory / "manifest.json").is_file():
            known = versions(directory.parent)
            raise RegistryError(f"{name}/{version}: no such version (known: {known or 'none'})")
        return directory

    def _read(self, document: str) -> Document | None:
        try:
            return self.store.read(document)
        except StoreError as e:
            raise RegistryError(str(e)) from e

    def _write_route(self, name: str, route: ModelRoute, what: str) -> Document:
        table, version = self.routing()
        new = RoutingTable(table.index_version, {**table.models, name: route})
        body = new.to_document()
        try:
            parse_routing(body, known_versions=self.known_versions())
            return self.store.write(
                ROUTING, body, expected_version=version, author=f"{self.author}: {what}"
            )
        except (RoutingError, StoreError) as e:
            raise RegistryError(f"{what}: {e}") from e

    def serving_inputs(self) -> tuple[Any, Any, str, str]:
        """World, feature tables and their versions behind the served index."""
        return self._serving_inputs()

    def _serving_inputs(self) -> tuple[Any, Any, str, str]:
        """World, feature tables and their versions behind the served index (else the latest),
        their files checked against their manifests."""
        try:
            try:
                table, _ = self.routing()
            except RegistryError:
                table = None
            if table is not None:
                lineage = self.root.lineage(table.index_version)
                features_version, features_dir = lineage.features_version, lineage.features_dir
                world_version, world_dir = lineage.world_version, lineage.world_dir
            else:
                features_dir = self.root.latest(self.root.features)
                features_version = features_dir.name
                world_version = str(verify(features_dir)["world_version"])
                world_dir = self.root.world_dir(world_version, "world_version")
                verify(world_dir)
            world = load_world(world_dir)
            tables = load_feature_tables(features_dir, world.catalogue)
        except (ArtifactError, KeyError, FileNotFoundError) as e:
            raise RegistryError(f"{self.root.path}: no world and features to train on ({e})") from e
        return world, tables, features_version, world_version
