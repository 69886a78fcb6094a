"""Compiled model binaries are native code: what is checked before one is loaded.

A binary is loaded only from an artifact root (and compiled/ cache) that group and others cannot
write, only if its recorded sha256 matches, and only if it is a complete ELF object; otherwise
the version scores with LightGBM and a WARNING says why. Registering a model into a root that
group or others can write is refused. The binaries here are the real ones `recsys build`
compiled for the test world.
"""

from __future__ import annotations

import logging
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from recsys.artifacts import ArtifactRoot
from recsys.build import BuildReport
from recsys.cli.main import main
from recsys.ranking.compiled import ENGINE_LIGHTGBM, ENGINE_LLEAVES, CompileError
from recsys.ranking.registry import load_for_serving

NAME = "ranker"
REGISTRY_LOGGER = "recsys.ranking.registry"


def _binary(artifacts: Path, version: str) -> Path:
    found = sorted((artifacts / "compiled" / NAME / version).glob("*.bin"))
    assert len(found) == 1, found
    return found[0]


def _add_mode(path: Path, bits: int) -> None:
    path.chmod(stat.S_IMODE(path.stat().st_mode) | bits)


@pytest.fixture
def version(built_world: tuple[Path, BuildReport]) -> str:
    return built_world[1].model_version


def test_the_built_binary_loads(artifacts: Path, version: str) -> None:
    model, note = load_for_serving(ArtifactRoot(artifacts), NAME, version)
    assert model.engine == ENGINE_LLEAVES, note


_CHILD = textwrap.dedent(
    """
    import hashlib, logging, sys
    from pathlib import Path
    from recsys.artifacts import ArtifactRoot
    from recsys.ranking.registry import load_for_serving

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    root, version, binary = ArtifactRoot(Path(sys.argv[1])), sys.argv[2], Path(sys.argv[3])
    whole = binary.read_bytes()
    for size in map(int, sys.argv[4:]):
        data = whole[:size]
        binary.write_bytes(data)
        binary.with_suffix(".sha256").write_text(hashlib.sha256(data).hexdigest() + "\\n")
        model, note = load_for_serving(root, "ranker", version)
        print(size, model.engine, flush=True)
    """
)


def test_a_truncated_binary_with_a_matching_hash_falls_back_without_aborting(
    artifacts: Path, version: str
) -> None:
    """LLVM aborts the whole process on a truncated object file ("section header table goes
    past the end of the file"), so the load runs in a child process."""
    binary = _binary(artifacts, version)
    size = binary.stat().st_size
    cuts = [10, 100, size // 2, size - 1]
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(artifacts), version, str(binary), *map(str, cuts)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.split() == [w for cut in cuts for w in (str(cut), ENGINE_LIGHTGBM)]
    warnings = [line for line in child.stderr.splitlines() if line.startswith("WARNING ")]
    assert len(warnings) == len(cuts), child.stderr
    for line in warnings:
        assert line.startswith(f"WARNING {REGISTRY_LOGGER}: model {NAME}/{version}")
        assert "not a complete ELF object" in line
        assert binary.name in line


def test_the_object_file_check(artifacts: Path, version: str, tmp_path: Path) -> None:
    from recsys.ranking.compiled import check_object_file

    whole = _binary(artifacts, version).read_bytes()
    check_object_file(_binary(artifacts, version))
    candidate = tmp_path / "candidate.bin"
    for data in (b"", b"\x7fEL", whole[:16], whole[:63], whole[:64], whole[: len(whole) // 3]):
        candidate.write_bytes(data)
        with pytest.raises(CompileError, match="not a complete ELF object"):
            check_object_file(candidate)
    candidate.write_bytes(b"MZ" + whole[2:])
    with pytest.raises(CompileError, match="not an ELF object"):
        check_object_file(candidate)
    # The section header table, or one section's data, past the end of an untruncated file.
    shoff = int.from_bytes(whole[0x28:0x30], "little")
    beyond = bytearray(whole)
    beyond[0x28:0x30] = len(whole).to_bytes(8, "little")
    candidate.write_bytes(bytes(beyond))
    with pytest.raises(CompileError, match="section header table ends at byte"):
        check_object_file(candidate)
    beyond = bytearray(whole)
    offset = shoff + 2 * 64 + 24  # sh_offset of section 2
    beyond[offset : offset + 8] = len(whole).to_bytes(8, "little")
    candidate.write_bytes(bytes(beyond))
    with pytest.raises(CompileError, match="section 2 ends at byte"):
        check_object_file(candidate)


@pytest.mark.parametrize("bits", [stat.S_IWGRP, stat.S_IWOTH], ids=["group", "others"])
@pytest.mark.parametrize("where", ["root", "compiled", "compiled/ranker", "version", "binary"])
def test_compiled_code_is_not_loaded_from_a_root_others_can_write(
    artifacts: Path, version: str, caplog: pytest.LogCaptureFixture, where: str, bits: int
) -> None:
    binary = _binary(artifacts, version)
    path = {
        "root": artifacts,
        "compiled": artifacts / "compiled",
        "compiled/ranker": artifacts / "compiled" / NAME,
        "version": binary.parent,
        "binary": binary,
    }[where]
    _add_mode(path, bits)

    with caplog.at_level(logging.WARNING, logger=REGISTRY_LOGGER):
        model, note = load_for_serving(ArtifactRoot(artifacts), NAME, version)

    assert model.engine == ENGINE_LIGHTGBM
    assert f"{path} is writable by group or others" in note
    records = [r for r in caplog.records if r.name == REGISTRY_LOGGER]
    assert [r.levelno for r in records] == [logging.WARNING]
    assert f"{path} is writable by group or others" in records[0].getMessage()


def test_nothing_is_compiled_into_a_cache_others_can_write(artifacts: Path, version: str) -> None:
    cache = artifacts / "compiled"
    for p in sorted(cache.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    _add_mode(cache, stat.S_IWOTH)

    model, note = load_for_serving(ArtifactRoot(artifacts), NAME, version)

    assert model.engine == ENGINE_LIGHTGBM
    assert "is writable by group or others" in note
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize(
    ("where", "name"), [("", "other"), ("models", "other"), ("models/ranker", NAME)]
)
def test_registering_into_a_root_others_can_write_is_refused(
    artifacts: Path, version: str, capsys: pytest.CaptureFixture[str], where: str, name: str
) -> None:
    path = artifacts / where if where else artifacts
    _add_mode(path, stat.S_IWGRP)
    model_file = artifacts / "models" / NAME / version / "model.txt"
    before = sorted(p.relative_to(artifacts) for p in (artifacts / "models").rglob("*"))

    code = main(
        ["models", "register", "--artifacts", str(artifacts), "--model-file", str(model_file),
         "--name", name]
    )  # fmt: skip
    out, err = capsys.readouterr()

    assert code == 2
    assert out == ""
    assert err.startswith(f"recsys: {path} is writable by group or others")
    assert f"chmod go-w {path}" in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.relative_to(artifacts) for p in (artifacts / "models").rglob("*")) == before
