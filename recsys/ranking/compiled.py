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

A cached binary is native code the process will run, so before one is loaded (docs/security.md):

- the artifact root, ``compiled/`` and every directory down to the binary, the binary and its
  digest file must not be writable by group or others (else nothing is loaded or compiled);
- the binary's sha256 must match its recorded digest (else it is compiled again);
- it must be a complete ELF object for this machine (:func:`check_object_file`): LLVM aborts the
  whole process on a truncated object file instead of raising, so a binary that fails is refused.

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
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from recsys.artifacts import (
    ArtifactError,
    chain,
    check_not_shared_writable,
    make_directories,
    sha256_file,
)

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
    *,
    root: Path | None = None,
) -> CompiledModel:
    """The compiled model of ``model_file``, from ``cache_dir`` or compiled into it.

    ``root``: the artifact root ``cache_dir`` lies in (None: ``cache_dir`` alone); it and every
    directory from it down to ``cache_dir``, the binary and its digest file must not be writable
    by group or others. Raises :class:`CompileError` if they are, if compilation is unavailable
    or fails, if a cached binary whose digest matches is not a complete ELF object, or if the
    binary does not reproduce ``golden_scores`` within ``tolerance``.
    """
    key = cache_key(model_hash)
    binary = cache_dir / f"{key}.bin"
    digest_file = binary.with_suffix(".sha256")
    trusted = chain(root, *cache_dir.relative_to(root).parts) if root is not None else [cache_dir]
    try:
        check_not_shared_writable([*trusted, binary, digest_file], "load compiled code from it")
    except (ArtifactError, ValueError) as e:
        raise CompileError(str(e)) from e
    try:
        import lleaves  # type: ignore[import-untyped]
    except ImportError as e:
        raise CompileError(f"lleaves cannot be imported: {e}") from e
    try:
        engine = lleaves.Model(model_file=str(model_file))
        # lleaves loads a cached object file without any check, and LLVM aborts the process on
        # a damaged one: only a binary whose recorded hash matches and that is a complete ELF
        # object is loaded. One whose hash does not match is compiled again.
        if binary.is_file() and _digest_matches(binary, digest_file):
            check_object_file(binary)
            engine.compile(cache=str(binary), **COMPILE_FLAGS)
        else:
            make_directories(cache_dir)
            # lleaves writes the cache in place; write a private file and rename it so other
            # processes see a whole binary or none.
            fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".compiling-", suffix=".bin")
            os.close(fd)
            os.unlink(tmp)
            try:
                engine.compile(cache=tmp, **COMPILE_FLAGS)
                _write_0644(digest_file, sha256_file(Path(tmp)) + "\n")
                os.chmod(tmp, 0o644)
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


def _write_0644(path: Path, text: str) -> None:
    """Write ``path`` with mode 0644 (writable by its owner only), whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o644)
        f.write(text)


_ELF_MAGIC = b"\x7fELF"
_ELF_CLASSES = {1: ("I", 52, 40), 2: ("Q", 64, 64)}
"""EI_CLASS -> (address format, ELF header size, section header entry size): 32 and 64 bit."""
_ELF_ORDER = {1: "<", 2: ">"}
_ET_REL = 1
_SHT_NOBITS = 8
_MACHINES = {"x86_64": 62, "amd64": 62, "aarch64": 183, "arm64": 183}
"""platform.machine() -> ELF e_machine of the code LLVM emits for it (others are not checked)."""


def check_object_file(path: Path) -> None:
    """Raise :class:`CompileError` unless ``path`` is a complete ELF relocatable object for this
    machine: the magic bytes, a known class and byte order, and a file long enough for its
    header, its section header table and every section's data (the header says where they
    are). This is what LLVM would otherwise find out by aborting the process."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CompileError(f"{path}: cannot read it: {e}") from e
    size = len(data)

    def incomplete(why: str) -> CompileError:
        return CompileError(f"{path}: not a complete ELF object ({why}, the file has {size} bytes)")

    if size < 16:
        if _ELF_MAGIC.startswith(data[:4]):
            raise incomplete("shorter than the ELF identification")
        raise CompileError(f"{path}: not an ELF object (no ELF magic bytes)")
    if data[:4] != _ELF_MAGIC:
        raise CompileError(f"{path}: not an ELF object (no ELF magic bytes)")
    if data[4] not in _ELF_CLASSES or data[5] not in _ELF_ORDER or data[6] != 1:
        raise CompileError(f"{path}: not an ELF object this code reads (class, byte order)")
    address, header_size, entry_size = _ELF_CLASSES[data[4]]
    order = _ELF_ORDER[data[5]]
    if size < header_size:
        raise incomplete(f"the ELF header needs {header_size} bytes")
    e_type, e_machine = struct.unpack_from(order + "HH", data, 16)
    e_shoff = struct.unpack_from(order + address, data, 0x28 if data[4] == 2 else 0x20)[0]
    e_shentsize, e_shnum = struct.unpack_from(order + "HH", data, header_size - 6)
    expected_machine = _MACHINES.get(platform.machine().lower())
    if e_type != _ET_REL or (expected_machine is not None and e_machine != expected_machine):
        raise CompileError(
            f"{path}: not a relocatable ELF object for this machine (type {e_type}, machine "
            f"{e_machine})"
        )
    if e_shoff == 0 or e_shentsize != entry_size:
        raise incomplete(f"no section header table (offset {e_shoff}, entry size {e_shentsize})")
    if e_shoff + entry_size > size:
        raise incomplete(f"section header table ends at byte {e_shoff + entry_size} or later")
    if e_shnum == 0:  # more than 0xff00 sections: the count is section 0's sh_size
        e_shnum = _section(data, order, address, e_shoff)[2]
    table_end = e_shoff + e_shnum * entry_size
    if table_end > size:
        raise incomplete(f"section header table ends at byte {table_end}")
    for index in range(1, e_shnum):
        sh_type, sh_offset, sh_size = _section(data, order, address, e_shoff + index * entry_size)
        if sh_type != _SHT_NOBITS and sh_offset + sh_size > size:
            raise incomplete(f"section {index} ends at byte {sh_offset + sh_size}")


def _section(data: bytes, order: str, address: str, at: int) -> tuple[int, int, int]:
    """(sh_type, sh_offset, sh_size) of the section header at byte ``at``."""
    if address == "Q":
        sh_type, sh_offset, sh_size = struct.unpack_from(order + "4xI16xQQ", data, at)
    else:
        sh_type, sh_offset, sh_size = struct.unpack_from(order + "4xI8xII", data, at)
    return int(sh_type), int(sh_offset), int(sh_size)


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
