"""Compiled inference: a model version's trees as native code (lleaves on LLVM), cached on disk.

Compilation costs seconds to a minute per model, so it never runs on the request path: the
registry compiles when a version is registered, and the serving state loader (off the event
loop) compiles a version whose binary is not cached yet. The binary is cached under the artifact
root at ``compiled/<name>/<version>/<key>.bin`` where the key hashes everything the machine code
depends on: the model's content hash, the CPU name and features LLVM targets, and the versions
of lleaves, llvmlite and this module's compile flags. A binary from another CPU or library
version is never loaded (its key differs), so a fleet can share one artifact root.

Every compiled model is checked against the version's golden scores (the LightGBM outputs saved
at training) before it is used; any failure (lleaves or llvmlite missing or incompatible, a
compile error, a mismatch) raises :class:`CompileError` and the caller keeps scoring with
LightGBM at ``num_threads=1``.

lleaves 1.3.0 needs the legacy pass manager (``llvm.PassManagerBuilder``), which llvmlite
removed in 0.45 (LLVM 20); llvmlite 0.44.0 (LLVM 15) is the pinned pair that works.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from recsys.artifacts import sha256_file

ENGINE_LIGHTGBM = "lightgbm"
ENGINE_LLEAVES = "lleaves"
COMPILE_FLAGS: dict[str, Any] = {"fblocksize": 34, "finline": False, "fcodemodel": "large"}
"""Cache-blocked trees without inlining: compiles ~6x faster than inlined (2.5 s vs 14 s CPU for
86 trees); speeds of both in benchmarks/bench_scoring.py."""


class CompileError(Exception):
    """A model could not be compiled or the binary disagrees with LightGBM; says why."""


def library_versions() -> dict[str, str]:
    """lleaves and llvmlite versions; raises :class:`CompileError` when either is missing."""
    found: dict[str, str] = {}
    for package in ("lleaves", "llvmlite"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError as e:
            raise CompileError(f"{package} is not installed: compiled scoring unavailable") from e
    return found


def target_description() -> dict[str, str]:
    """The CPU LLVM compiles for: process triple, CPU name and feature string."""
    try:
        import llvmlite.binding as llvm  # type: ignore[import-untyped]

        llvm.initialize()
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        try:
            features = llvm.get_host_cpu_features().flatten()
        except RuntimeError:  # LLVM cannot detect features on some hosts
            features = ""
        return {
            "triple": str(llvm.get_process_triple()),
            "cpu": str(llvm.get_host_cpu_name()),
            "features": str(features),
        }
    except (ImportError, AttributeError, RuntimeError) as e:
        raise CompileError(f"llvmlite cannot describe this CPU: {e}") from e


def cache_key(model_hash: str) -> str:
    """Hash of everything the compiled binary depends on (see the module docstring)."""
    parts = {
        "model": model_hash,
        "target": target_description(),
        "libraries": library_versions(),
        "flags": COMPILE_FLAGS,
        "python": platform.python_implementation(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class CompiledModel:
    """A compiled forest; ``predict`` drops the GIL and is safe to call from many threads."""

    engine: Any
    """The compiled ``lleaves.Model``."""
    binary: Path
    """The cached object file it was loaded from."""

    def predict(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        # float64 like LightGBM (it compares thresholds in double), so scores agree exactly.
        data = np.ascontiguousarray(features, dtype=np.float64)
        return np.asarray(self.engine.predict(data, n_jobs=1), dtype=np.float32)


def compile_model(
    model_file: Path,
    cache_dir: Path,
    model_hash: str,
    golden_features: npt.NDArray[np.float32],
    golden_scores: npt.NDArray[np.float64],
    tolerance: float,
) -> CompiledModel:
    """The compiled model of ``model_file``, from ``cache_dir`` or compiled into it.

    Raises :class:`CompileError` if compilation is unavailable or fails, or if the binary does
    not reproduce ``golden_scores`` within ``tolerance``.
    """
    key = cache_key(model_hash)
    binary = cache_dir / f"{key}.bin"
    try:
        import lleaves  # type: ignore[import-untyped]
    except ImportError as e:
        raise CompileError(f"lleaves cannot be imported: {e}") from e
    digest_file = binary.with_suffix(".sha256")
    try:
        engine = lleaves.Model(model_file=str(model_file))
        # lleaves loads a cached object file without any check, and a truncated one could take
        # the process down: only a binary whose recorded hash matches is loaded.
        if binary.is_file() and _digest_matches(binary, digest_file):
            engine.compile(cache=str(binary), **COMPILE_FLAGS)
        else:
            cache_dir.mkdir(parents=True, exist_ok=True)
            # lleaves writes the cache in place; write a private file and rename it so other
            # processes see a whole binary or none.
            fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".compiling-", suffix=".bin")
            os.close(fd)
            os.unlink(tmp)
            try:
                engine.compile(cache=tmp, **COMPILE_FLAGS)
                digest_file.write_text(sha256_file(Path(tmp)) + "\n")
                os.replace(tmp, binary)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
    except CompileError:
        raise
    except Exception as e:  # lleaves and llvmlite raise many types; any of them means "no"
        raise CompileError(f"{model_file}: lleaves could not compile it: {e!r}") from e
    compiled = CompiledModel(engine=engine, binary=binary)
    check_golden(compiled, golden_features, golden_scores, tolerance, str(model_file))
    return compiled


def _digest_matches(binary: Path, digest_file: Path) -> bool:
    try:
        return digest_file.read_text().strip() == sha256_file(binary)
    except OSError:
        return False


def check_golden(
    compiled: CompiledModel,
    features: npt.NDArray[np.float32],
    expected: npt.NDArray[np.float64],
    tolerance: float,
    where: str,
) -> None:
    actual = np.asarray(
        compiled.engine.predict(np.ascontiguousarray(features, dtype=np.float64), n_jobs=1),
        dtype=np.float64,
    )
    error = np.abs(actual - expected)
    if actual.shape != expected.shape or not (error <= tolerance).all():
        worst = float(np.nanmax(error)) if error.size else float("nan")
        raise CompileError(
            f"{where}: the compiled model does not reproduce the golden scores "
            f"(largest difference {worst!r}, tolerance {tolerance})"
        )
