"""What checking the world's and features' files against their manifests costs a load.

Times ``IndexLoader.load`` (lineage, world, features, index: what a server does at start-up and
at every index swap) on one built root, in each mode, interleaved round by round so the
machine's noise falls on every mode alike:

- ``trust``: the same load with the world's and features' files not hashed
  (``ArtifactRoot.lineage(verify_files=False)``); the index checks its own files, as it always
  did;
- ``verify``: the load as the server does it: each file's xxh3-128 where the manifest records
  one (``files_xxh3``), else its sha256;
- ``sha256``: a root built before the fast hash: the index, features and world versions
  hard-linked into a temporary root beside ``--artifacts`` (same files, same page cache) with
  ``files_xxh3`` dropped from their manifests, so every file is checked with sha256.

The page cache is warm: one untimed load in each mode comes before the rounds. One JSON line
per mode: the seconds of each round, their min and median, the megabytes of world and features
files the check hashes, and the load average before and after the rounds. A load that fails (a
file that does not match its manifest) ends the run with that mode's error, exit 1.

    python -m benchmarks.bench_verify --artifacts /tmp/art4m [--rounds 5] [--modes trust,verify]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from recsys.artifacts import (
    FAST_FILES,
    MANIFEST,
    ArtifactError,
    ArtifactRoot,
    Lineage,
    read_manifest,
)
from recsys.pipeline.loading import IndexLoader, SnapshotError

MODES = ("trust", "verify", "sha256")


class TrustingRoot(ArtifactRoot):
    """The root whose lineage hashes none of the world's and features' files."""

    def lineage(self, index_version: str, *, verify_files: bool = True) -> Lineage:
        return super().lineage(index_version, verify_files=False)


def sha256_only_root(root: ArtifactRoot, lineage: Lineage, into: Path) -> ArtifactRoot:
    """The lineage's three versions hard-linked under ``into``, their manifests without the fast
    hashes (as a root built before them)."""
    for source in (lineage.index_dir, lineage.features_dir, lineage.world_dir):
        target = into / source.relative_to(root.path)
        target.mkdir(parents=True)
        for path in sorted(source.rglob("*")):
            copy = target / path.relative_to(source)
            if path.is_dir():
                copy.mkdir()
            elif path == source / MANIFEST:
                manifest = read_manifest(source)
                manifest.pop(FAST_FILES, None)
                copy.write_text(json.dumps(manifest))
            else:
                try:
                    os.link(path, copy)
                except OSError as e:
                    raise SystemExit(
                        f"sha256: cannot hard-link {path} into {into} ({e}); "
                        "leave the mode out with --modes trust,verify"
                    ) from e
    return ArtifactRoot(into)


def megabytes(*directories: Path) -> float:
    size = sum(p.stat().st_size for d in directories for p in d.rglob("*") if p.is_file())
    return round(size / 1e6, 1)


def load_seconds(mode: str, root: ArtifactRoot, index_version: str) -> float:
    started = time.perf_counter()
    try:
        loaded = IndexLoader(root).load(index_version)
    except SnapshotError as e:
        raise SystemExit(f"{mode}: {e}") from e
    seconds = time.perf_counter() - started
    del loaded
    gc.collect()
    return seconds


def modes_of(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise argparse.ArgumentTypeError(
            f"--modes {text!r}: expected a comma-separated list of {', '.join(MODES)}"
        )
    return modes


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def measure(
    artifacts: Path,
    index_version: str | None,
    modes: Sequence[str],
    rounds: int,
    say: Callable[[str], None],
) -> None:
    root = ArtifactRoot(artifacts)
    version = index_version or root.latest(root.indexes).name
    lineage = root.lineage(version, verify_files=False)
    with tempfile.TemporaryDirectory(prefix=".bench-verify-", dir=artifacts.parent) as scratch:
        roots: dict[str, ArtifactRoot] = {"trust": TrustingRoot(artifacts), "verify": root}
        if "sha256" in modes:
            roots["sha256"] = sha256_only_root(root, lineage, Path(scratch))
        load_before = load_average()
        for mode in modes:  # warms the page cache; not timed
            load_seconds(mode, roots[mode], version)
        seconds: dict[str, list[float]] = {mode: [] for mode in modes}
        for _ in range(rounds):
            for mode in modes:
                seconds[mode].append(load_seconds(mode, roots[mode], version))
    load_after = load_average()
    hashed_mb = megabytes(lineage.features_dir, lineage.world_dir)
    index_mb = megabytes(lineage.index_dir)
    for mode in modes:
        say(
            json.dumps(
                {
                    "mode": mode,
                    "index_version": version,
                    "hashed_mb": hashed_mb,
                    "index_mb": index_mb,
                    "rounds": rounds,
                    "seconds": [round(s, 3) for s in seconds[mode]],
                    "min_s": round(min(seconds[mode]), 3),
                    "median_s": round(statistics.median(seconds[mode]), 3),
                    "load_before": load_before,
                    "load_after": load_after,
                }
            )
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--index", default=None, help="index version (default: the newest)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--modes", type=modes_of, default=list(MODES), help=", ".join(MODES))
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds is {args.rounds}; expected >= 1")
    try:
        measure(args.artifacts.resolve(), args.index, args.modes, args.rounds, print)
    except ArtifactError as e:
        raise SystemExit(f"--artifacts {args.artifacts}: {e}") from e


if __name__ == "__main__":
    main()
