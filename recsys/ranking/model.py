"""Ranking model versions: save a trained ranker as an immutable version, load and validate it.

A version is ``models/<name>/<version>/`` holding ``model.txt`` (the LightGBM text model) and a
manifest: feature schema, training-data fingerprint, params, code version, the feature and world
versions it was trained on, offline metrics, golden inputs with their expected scores, and the
training distribution of every feature and of the score (the drift monitor's baseline).

:func:`load_model` refuses a version, with :class:`ModelRejected` saying why, if its files
do not match their hashes, its schema is not this code's ``FEATURE_NAMES``, it scores NaN, or it
does not reproduce its golden scores.

Thread safety: ``Booster.predict`` goes through ``LGBM_BoosterPredictForMat``, which builds a
fresh predictor per call under the booster's shared lock, so concurrent calls on one booster are
safe as long as they all use the same iteration range (lightgbm-org/LightGBM#666; the data race
in #6142 needs different ``num_iteration`` values). Saved models hold only their best trees and
:meth:`RankingModel.predict` always predicts with all of them, single-threaded per call.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import numpy.typing as npt

from recsys import artifacts
from recsys.artifacts import ArtifactError, ArtifactRoot
from recsys.ranking.compiled import (
    ENGINE_LIGHTGBM,
    ENGINE_LLEAVES,
    CompiledModel,
    CompileError,
    compile_model,
)
from recsys.ranking.features import (
    CATEGORICAL_FEATURES,
    FEATURE_NAMES,
    FeatureTables,
    feature_types,
)
from recsys.ranking.training import RankerParams, TrainedRanker

MODEL_FILE = "model.txt"
MODEL_KIND = "ranking-model"
MODEL_FORMAT = "lightgbm-text"
GOLDEN_TOLERANCE = 1e-5
"""Absolute tolerance on golden scores (float32 outputs of the same trees agree far closer)."""
_CODE_FILES = ("features.py", "training.py", "model.py")
_TREE_SIZES = re.compile(r"^tree_sizes=.*\n", re.MULTILINE)


REJECTION_REASONS = ("corrupt", "schema", "golden", "nan", "latency", "missing")
"""Why a model version can be refused: a bounded label for metrics (the message says more)."""


class ModelRejected(Exception):
    """A model version is corrupt or does not fit this code; the message says what is wrong and
    ``reason`` (one of :data:`REJECTION_REASONS`) says which check refused it."""

    def __init__(self, message: str, *, reason: str) -> None:
        if reason not in REJECTION_REASONS:
            raise ValueError(f"reason: expected one of {REJECTION_REASONS}, got {reason!r}")
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, eq=False)
class RankingModel:
    """A loaded, validated model version. Immutable; share it between threads."""

    name: str
    version: str
    manifest: dict[str, Any]
    booster: lgb.Booster
    compiled: CompiledModel | None = None
    """Native code for the same trees (checked against the golden scores); None: LightGBM."""
    directory: Path | None = None

    @property
    def engine(self) -> str:
        return ENGINE_LLEAVES if self.compiled is not None else ENGINE_LIGHTGBM

    @property
    def content_hash(self) -> str:
        return str(self.manifest.get("content_hash", self.version))

    def with_compiled(self, cache_root: Path) -> RankingModel:
        """This model scoring with compiled code cached under ``cache_root`` (an artifact
        root's ``compiled/``).

        Compiles when no binary for this model, CPU and library versions is cached (seconds to
        a minute: call it off the request path). Raises ``CompileError`` on any failure, which
        includes an artifact root, cache directory or binary that group or others can write
        (``compile_model``); the caller keeps this LightGBM-backed model.
        """
        if self.directory is None:
            raise ValueError(f"model {self.name}/{self.version}: loaded without a directory")
        try:
            artifacts.check_id(self.name, "model name")
            artifacts.check_id(self.version, "model version")
            cache_dir = ArtifactRoot(cache_root).inside(
                cache_root / self.name / self.version, "compiled model"
            )
        except ArtifactError as e:
            raise CompileError(str(e)) from e
        golden = self.manifest["golden"]
        compiled = compile_model(
            self.directory / MODEL_FILE,
            cache_dir,
            self.content_hash,
            np.asarray(golden["features"], dtype=np.float32),
            np.asarray(golden["scores"], dtype=np.float64),
            float(golden.get("tolerance", GOLDEN_TOLERANCE)),
            root=cache_root.parent,
        )
        return replace(self, compiled=compiled)

    def predict_lightgbm(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Scores from LightGBM itself (num_threads=1), whatever the engine."""
        return np.asarray(self.booster.predict(features, num_threads=1), dtype=np.float32)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(self.manifest["feature_schema"]["names"])

    @property
    def metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = self.manifest.get("metrics", {})
        return metrics

    def predict(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Scores of ``[M, len(FEATURE_NAMES)]`` rows from ``assemble_features``; thread-safe."""
        if features.ndim != 2 or features.shape[1] != len(FEATURE_NAMES):
            raise ValueError(
                f"features has shape {features.shape}, expected (rows, {len(FEATURE_NAMES)})"
            )
        if features.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        if self.compiled is not None:
            return self.compiled.predict(features)
        return self.predict_lightgbm(features)


def code_version() -> str:
    """Package version plus a hash of the ranking sources that define features and scores."""
    try:
        package = importlib.metadata.version("recsys")
    except importlib.metadata.PackageNotFoundError:
        package = "0+unknown"
    digest = hashlib.sha256()
    here = Path(__file__).parent
    for name in _CODE_FILES:
        digest.update((here / name).read_bytes())
    return f"{package}+src.{digest.hexdigest()[:12]}"


def _predict_exact(booster: lgb.Booster, features: npt.NDArray[np.float32]) -> list[float]:
    return [float(s) for s in np.asarray(booster.predict(features, num_threads=1))]


def save_model_version(
    root: ArtifactRoot,
    name: str,
    trained: TrainedRanker,
    tables: FeatureTables,
    *,
    features_version: str,
    world_version: str,
    params: RankerParams | None,
    lineage: Mapping[str, Any] | None = None,
) -> str:
    """Publish ``trained`` as a new immutable version of model ``name``; returns the version id.

    ``lineage`` (retraining from logged traffic: parent version, data windows and their content
    hashes) goes into the manifest as ``lineage``.

    ``tables`` are the feature tables it was trained on (their shape goes in the manifest).
    ``params`` None: trained elsewhere (its LightGBM parameters are in the model text).
    Saving the same model again returns the same version. Raises ValueError for a name that is
    not an id (``artifacts.check_id``) or a root (``models/``, ``models/<name>``) that group or
    others can write.
    """
    try:
        parent = root.models(name)
        artifacts.check_not_shared_writable(
            artifacts.chain(root.path, "models", name), "register a model into it"
        )
    except ArtifactError as e:
        raise ValueError(str(e)) from e
    golden = trained.golden_features
    manifest: dict[str, Any] = {
        "kind": MODEL_KIND,
        "name": name,
        "format": MODEL_FORMAT,
        "model_file": MODEL_FILE,
        "lightgbm_version": lgb.__version__,
        "code_version": code_version(),
        "feature_schema": {
            "names": list(FEATURE_NAMES),
            "types": feature_types(),
            "dtype": "float32",
            "categorical": list(CATEGORICAL_FEATURES),
        },
        "features_version": features_version,
        "world_version": world_version,
        "feature_tables": {
            "users": tables.n_users,
            "items": tables.catalogue.n_items,
            "restaurants": tables.catalogue.n_restaurants,
            "dim": tables.dim,
        },
        "train_fingerprint": trained.train_fingerprint,
        "params": asdict(params) if params is not None else {"trained": "elsewhere"},
        "num_trees": trained.booster.num_trees(),
        "metrics": trained.metrics,
        "feature_importance": trained.feature_importance,
        "golden": {
            "tolerance": GOLDEN_TOLERANCE,
            "features": [[float(v) for v in row] for row in golden],
            "scores": _predict_exact(trained.booster, golden),
        },
        "baseline": trained.baseline,
    }
    if lineage is not None:
        manifest["lineage"] = dict(lineage)
    with artifacts.staging(parent) as tmp:
        (tmp / MODEL_FILE).write_text(trained.booster.model_to_string())
        version, _ = artifacts.publish(tmp, parent, manifest)
    return version


def load_model(directory: Path) -> RankingModel:
    """Load and validate the model version in ``directory``.

    Raises :class:`ModelRejected` naming the problem: files that do not match the
    manifest, a manifest of another kind, a feature schema other than ``FEATURE_NAMES``, a model
    LightGBM cannot parse, NaN scores, or golden scores that do not reproduce.
    """
    try:
        manifest = artifacts.verify(directory)
    except ArtifactError as e:
        raise ModelRejected(str(e), reason="corrupt") from e
    where = str(directory)
    if manifest.get("kind") != MODEL_KIND or manifest.get("format") != MODEL_FORMAT:
        raise ModelRejected(
            f"{where}: manifest kind/format is {manifest.get('kind')!r}/{manifest.get('format')!r},"
            f" expected {MODEL_KIND!r}/{MODEL_FORMAT!r}",
            reason="corrupt",
        )
    # The manifest is not covered by its own hashes, and its name and version name the
    # compiled cache directory: both must be plain ids.
    try:
        name = artifacts.check_id(manifest.get("name", directory.parent.name), "model name")
        version = artifacts.check_id(manifest.get("version", ""), "model version")
    except ArtifactError as e:
        raise ModelRejected(f"{where}/{artifacts.MANIFEST}: {e}", reason="corrupt") from e
    _check_schema(where, manifest.get("feature_schema"))
    try:
        booster = parse_booster((directory / MODEL_FILE).read_text())
    except (lgb.basic.LightGBMError, OSError, UnicodeDecodeError) as e:
        raise ModelRejected(
            f"{where}/{MODEL_FILE}: not a LightGBM model: {e}", reason="corrupt"
        ) from e
    if list(booster.feature_name()) != list(FEATURE_NAMES):
        raise ModelRejected(
            f"{where}/{MODEL_FILE}: the trees use features {booster.feature_name()}, "
            f"expected {list(FEATURE_NAMES)}",
            reason="schema",
        )
    _check_golden(where, booster, manifest.get("golden"))
    return RankingModel(
        name=name,
        version=version,
        manifest=manifest,
        booster=booster,
        directory=directory,
    )


def parse_booster(text: str) -> lgb.Booster:
    """A booster from LightGBM model text, parsed so that a malformed file raises.

    With a ``tree_sizes`` header LightGBM parses trees in OpenMP workers, and a parse error
    there aborts the whole process (std::terminate) instead of raising. Without it, trees are
    parsed on the calling thread and errors surface as ``LightGBMError``.
    """
    return lgb.Booster(model_str=_TREE_SIZES.sub("", text, count=1))


def load_model_version(root: ArtifactRoot, name: str, version: str) -> RankingModel:
    """:func:`load_model` of ``models/<name>/<version>`` in ``root``; a name or version that is
    not an id is refused as missing (it cannot name a version)."""
    try:
        directory = root.model_dir(name, version)
    except ArtifactError as e:
        raise ModelRejected(str(e), reason="missing") from e
    if not directory.is_dir():
        raise ModelRejected(f"{directory}: no such model version of {name!r}", reason="missing")
    return load_model(directory)


def _check_schema(where: str, schema: Any) -> None:
    if not isinstance(schema, dict):
        raise ModelRejected(f"{where}: manifest has no feature_schema", reason="schema")
    names = schema.get("names")
    if names != list(FEATURE_NAMES):
        names = names if isinstance(names, list) else []
        missing = [n for n in FEATURE_NAMES if n not in names]
        unexpected = [n for n in names if n not in FEATURE_NAMES]
        detail = (
            f"missing {missing}, unexpected {unexpected}"
            if missing or unexpected
            else "same names in another order"
        )
        raise ModelRejected(
            f"{where}: feature schema does not match this code's FEATURE_NAMES ({detail}); "
            f"model has {names}, code expects {list(FEATURE_NAMES)}",
            reason="schema",
        )
    if schema.get("categorical") != list(CATEGORICAL_FEATURES):
        raise ModelRejected(
            f"{where}: categorical features {schema.get('categorical')} do not match this "
            f"code's {list(CATEGORICAL_FEATURES)}",
            reason="schema",
        )
    if schema.get("dtype") != "float32":
        raise ModelRejected(
            f"{where}: feature dtype {schema.get('dtype')!r}, expected 'float32'", reason="schema"
        )


def _check_golden(where: str, booster: lgb.Booster, golden: Any) -> None:
    if not isinstance(golden, dict) or not golden.get("features"):
        raise ModelRejected(f"{where}: manifest has no golden inputs", reason="golden")
    try:
        features = np.asarray(golden["features"], dtype=np.float32)
        expected = np.asarray(golden["scores"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelRejected(f"{where}: golden inputs are malformed: {e}", reason="golden") from e
    if features.ndim != 2 or features.shape[1] != len(FEATURE_NAMES):
        raise ModelRejected(
            f"{where}: golden features have shape {features.shape}, "
            f"expected (rows, {len(FEATURE_NAMES)})",
            reason="golden",
        )
    if expected.shape != (features.shape[0],):
        raise ModelRejected(
            f"{where}: {expected.shape[0]} golden scores for {features.shape[0]} golden rows",
            reason="golden",
        )
    actual = np.asarray(booster.predict(features, num_threads=1), dtype=np.float64)
    if np.isnan(actual).any():
        raise ModelRejected(
            f"{where}: the model scores NaN on {int(np.isnan(actual).sum())} golden rows",
            reason="nan",
        )
    error = np.abs(actual - expected)
    if not (error <= GOLDEN_TOLERANCE).all():
        row = int(np.argmax(np.where(np.isnan(error), np.inf, error)))
        raise ModelRejected(
            f"{where}: golden scores do not reproduce (row {row}: expected {expected[row]!r}, "
            f"got {actual[row]!r}; tolerance {GOLDEN_TOLERANCE})",
            reason="golden",
        )
