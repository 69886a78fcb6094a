"""Experiment tracking in MLflow: every training run, every registered version, every decision.

The project's registry (models/<name>/<version>/ and the routing document) stays the source of
truth for serving; MLflow is where people browse runs and compare versions. Nothing on the
serving path imports this module (tests/promotion/test_tracking.py checks it): MLflow is
imported when a tracker is opened, by the CLI commands that train, route or decide.

- :meth:`Tracker.log_version`: one run per registered version (kind ``build``, ``train``,
  ``register`` or ``retrain``) with the manifest's parameters and offline metrics, the lineage
  as tags, ``model.txt`` and ``manifest.json`` as artifacts; then an MLflow model version of the
  registered model of the same name, tagged ``recsys.version``. Idempotent per version.
- :meth:`Tracker.sync_aliases`: aliases ``champion`` (production) and ``challenger`` (the canary)
  follow the routing after every promote, canary and rollback.
- :meth:`Tracker.log_decision`: a decision record (gate verdict, canary step) as a JSON artifact
  of the version's run, and its latest decision as a model-version tag.

By default the store is sqlite under the artifact root (``<artifacts>/mlflow/mlflow.db``, files
in ``<artifacts>/mlflow/artifacts``); ``MLFLOW_TRACKING_URI`` points at a shared server.
``mlflow ui --backend-store-uri sqlite:///<artifacts>/mlflow/mlflow.db`` shows it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from recsys.artifacts import ArtifactRoot, read_manifest
from recsys.settings import TrackingSettings

if TYPE_CHECKING:
    from mlflow import MlflowClient

VERSION_TAG = "recsys.version"
CHAMPION = "champion"
CHALLENGER = "challenger"
_PARAM_LENGTH = 500


class TrackingError(Exception):
    """The tracking store cannot be reached or refused a write; the message says which."""


@dataclass(frozen=True)
class TrackedVersion:
    run_id: str
    model_version: str
    """The MLflow model version number (a string, as MLflow returns it)."""


def open_tracker(
    settings: TrackingSettings, say: Callable[[str], None] = lambda _m: None
) -> Tracker | None:
    """A tracker on ``settings``' store, or None when tracking is off or MLflow is absent."""
    if not settings.enabled:
        return None
    try:
        from mlflow import MlflowClient
    except ImportError:
        say("mlflow is not installed (pip install 'recsys[tracking]'): this run is not tracked")
        return None
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    if not settings.uri:
        settings.store_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        client = MlflowClient(tracking_uri=settings.store_uri, registry_uri=settings.store_uri)
    except Exception as e:  # MlflowException, sqlalchemy and connection errors alike
        raise TrackingError(f"MLflow tracking store {settings.store_uri}: {e}") from e
    return Tracker(client, settings)


def metric_key(name: str) -> str:
    """MLflow metric names allow letters, digits and ``_-. :/``: ``ndcg@20`` -> ``ndcg_at_20``."""
    return name.replace("@", "_at_")


def _flat(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(value)[:_PARAM_LENGTH]


class Tracker:
    def __init__(self, client: MlflowClient, settings: TrackingSettings) -> None:
        self.client = client
        self.settings = settings
        self._experiment_id: str | None = None

    @property
    def uri(self) -> str:
        return self.settings.store_uri

    def _experiment(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.settings.experiment)
            self._experiment_id = (
                found.experiment_id
                if found is not None
                else self.client.create_experiment(
                    self.settings.experiment, artifact_location=self.settings.artifact_location
                )
            )
        return self._experiment_id

    def find(self, name: str, version: str) -> TrackedVersion | None:
        """The MLflow model version of registry version ``name``/``version``, if tracked."""
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.search_model_versions(f"name = '{name}'")
        except MlflowException:
            return None
        for mv in found:
            if mv.tags.get(VERSION_TAG) == version:
                return TrackedVersion(run_id=str(mv.run_id), model_version=str(mv.version))
        return None

    def log_version(
        self,
        root: ArtifactRoot,
        name: str,
        version: str,
        kind: str,
        *,
        lineage: Mapping[str, Any] | None = None,
    ) -> TrackedVersion:
        """Log the training run of ``name``/``version`` and register it (once)."""
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.exceptions import MlflowException

        existing = self.find(name, version)
        if existing is not None:
            return existing
        directory = root.model_dir(name, version)
        manifest = read_manifest(directory)
        params: dict[str, str] = {}
        _flat("", manifest.get("params", {}), params)
        if lineage:
            _flat("lineage", lineage, params)
        now = int(time.time() * 1000)
        metrics = [
            Metric(metric_key(k), float(v), now, 0)
            for k, v in sorted(manifest.get("metrics", {}).items())
            if isinstance(v, int | float)
        ]
        tags = {
            "recsys.name": name,
            VERSION_TAG: version,
            "recsys.kind": kind,
            "recsys.code_version": str(manifest.get("code_version", "")),
            "recsys.features_version": str(manifest.get("features_version", "")),
            "recsys.world_version": str(manifest.get("world_version", "")),
            "recsys.train_fingerprint": str(manifest.get("train_fingerprint", "")),
            "recsys.content_hash": str(manifest.get("content_hash", "")),
        }
        if lineage and lineage.get("parent_version"):
            tags["recsys.parent_version"] = str(lineage["parent_version"])
        try:
            run = self.client.create_run(
                self._experiment(), run_name=f"{kind} {name}/{version}", tags=tags
            )
            run_id = run.info.run_id
            self.client.log_batch(
                run_id,
                metrics=metrics,
                params=[Param(k, v) for k, v in sorted(params.items())],
                tags=[RunTag("recsys.model_dir", str(directory))],
            )
            for file in ("model.txt", "manifest.json"):
                self.client.log_artifact(run_id, str(directory / file), artifact_path="model")
            self.client.set_terminated(run_id)
            try:
                self.client.get_registered_model(name)
            except MlflowException:
                self.client.create_registered_model(
                    name, description=f"recsys ranking model {name} (registry: {root.path})"
                )
            mv = self.client.create_model_version(
                name,
                source=f"{run.info.artifact_uri}/model",
                run_id=run_id,
                tags={VERSION_TAG: version},
                description=f"{kind} {name}/{version}",
            )
        except MlflowException as e:
            raise TrackingError(f"MLflow {self.uri}: logging {name}/{version}: {e}") from e
        return TrackedVersion(run_id=run_id, model_version=str(mv.version))

    def sync_aliases(
        self, root: ArtifactRoot, name: str, production: str, canary: str = ""
    ) -> dict[str, str]:
        """Aliases ``champion`` -> production and ``challenger`` -> canary (removed when there
        is no canary); versions not yet tracked are logged first. Returns alias -> MLflow
        version."""
        from mlflow.exceptions import MlflowException

        out = {}
        try:
            champion = self.log_version(root, name, production, "backfill")
            self.client.set_registered_model_alias(name, CHAMPION, champion.model_version)
            out[CHAMPION] = champion.model_version
            if canary:
                challenger = self.log_version(root, name, canary, "backfill")
                self.client.set_registered_model_alias(name, CHALLENGER, challenger.model_version)
                out[CHALLENGER] = challenger.model_version
            else:
                with contextlib.suppress(MlflowException):  # there was none
                    self.client.delete_registered_model_alias(name, CHALLENGER)
        except MlflowException as e:
            raise TrackingError(f"MLflow {self.uri}: aliases of {name}: {e}") from e
        return out

    def log_decision(
        self, root: ArtifactRoot, name: str, version: str, record: Mapping[str, Any]
    ) -> str:
        """Write ``record`` as ``decisions/<ms>-<decision>.json`` in the version's run and tag
        the model version with the decision; returns the artifact path."""
        from mlflow.exceptions import MlflowException

        tracked = self.log_version(root, name, version, "backfill")
        decision = str(record.get("decision", "decision"))
        path = f"decisions/{int(time.time() * 1000)}-{decision}.json"
        try:
            self.client.log_dict(tracked.run_id, json.loads(json.dumps(record, default=str)), path)
            self.client.set_model_version_tag(
                name, tracked.model_version, "recsys.decision", decision
            )
        except MlflowException as e:
            raise TrackingError(f"MLflow {self.uri}: decision on {name}/{version}: {e}") from e
        return path
