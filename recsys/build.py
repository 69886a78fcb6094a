"""`recsys build`: the demo world and every artifact serving needs, in one command.

world -> learned vectors and feature tables -> FAISS index -> LightGBM ranker -> control
documents (routing to the new versions, default experiments, empty availability). Each artifact
is a content-addressed version with a manifest, so the same seed gives the same version ids.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recsys import artifacts
from recsys.artifacts import ArtifactRoot
from recsys.settings import DEFAULT_ARTIFACTS, BuildSettings, env_default

Progress = Callable[[str], None]
INDEX_TARGET_RECALL = 0.95
INDEX_RECALL_K = 500
"""The index's default nprobe is the smallest that reaches INDEX_TARGET_RECALL at this depth
(recall@500 against exact search, on probe queries drawn from the real user vectors)."""


@dataclass
class BuildReport:
    world_version: str = ""
    features_version: str = ""
    index_version: str = ""
    model_version: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    offline_metrics: dict[str, float] = field(default_factory=dict)
    index_recall: float = 0.0
    index_nlist: int = 0
    index_nprobe: int = 0
    bytes_on_disk: int = 0
    peak_rss_mb: float = 0.0


STAGES = ("world", "vectors", "index", "ranker", "control")


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


@contextmanager
def _stage(name: str, report: BuildReport, say: Progress, bar: Any = None) -> Iterator[None]:
    say(f"[{name}] ...")
    start = time.perf_counter()
    yield
    took = time.perf_counter() - start
    report.seconds[name] = round(took, 2)
    say(f"[{name}] done in {took:.1f}s, peak RSS {peak_rss_mb():,.0f} MB")
    if bar is not None:
        bar.update(1)


def build(settings: BuildSettings, say: Progress = print) -> BuildReport:
    root = ArtifactRoot(settings.out)
    report = BuildReport()
    total = time.perf_counter()
    progress = say if settings.progress else None
    with _progress_bar(settings.progress, len(STAGES), "build", "stage") as bar:
        _build_stages(settings, root, report, say, progress, bar)
    report.seconds["total"] = round(time.perf_counter() - total, 2)
    report.bytes_on_disk = sum(
        p.stat().st_size for p in root.path.rglob("*") if p.is_file() and "control" not in p.parts
    )
    report.peak_rss_mb = peak_rss_mb()
    return report


@contextmanager
def _progress_bar(enabled: bool, total: int, desc: str, unit: str) -> Iterator[Any]:
    """A tqdm bar on stderr (None when progress is off, e.g. in tests)."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True) as bar:
        yield bar


def _build_stages(
    settings: BuildSettings,
    root: ArtifactRoot,
    report: BuildReport,
    say: Progress,
    progress: Progress | None,
    bar: Any,
) -> None:
    # Imported here: the CLI's --help must not pay for FAISS and LightGBM.
    from ranking.features import build_feature_tables, save_feature_tables
    from ranking.model import save_model_version
    from ranking.registry import load_for_serving
    from ranking.training import RankerParams, train_ranker
    from recsys.world import save_world
    from recsys.worldgen import generate_world
    from retrieval.embeddings import learn_embeddings
    from retrieval.index import build_index, save_index_version

    with _stage("world", report, say, bar):
        world = generate_world(settings.skus, settings.users, settings.seed, progress=progress)
        with artifacts.staging(root.path) as tmp:
            save_world(world, tmp)
            report.world_version, _ = artifacts.publish(
                tmp,
                root.world,
                {"kind": "world", "seed": settings.seed, "skus": settings.skus,
                 "users": settings.users, "log_rows": world.log.n_rows},
            )  # fmt: skip
    say(
        f"  {world.catalogue.n_restaurants:,} restaurants, {world.catalogue.n_items:,} SKUs, "
        f"{world.users.n_users:,} users, {world.log.n_rows:,} impressions"
    )

    with _stage("vectors", report, say, bar):
        emb = learn_embeddings(world, settings.dim, settings.seed, progress=progress)
        tables = build_feature_tables(world, emb.user_vectors, emb.item_vectors)
        with artifacts.staging(root.path) as tmp:
            save_feature_tables(tables, tmp)
            report.features_version, _ = artifacts.publish(
                tmp,
                root.features,
                {"kind": "features", "world_version": report.world_version,
                 "dim": settings.dim, "seed": settings.seed},
            )  # fmt: skip

    with _stage("index", report, say, bar):
        n_items = emb.item_vectors.shape[0]
        with _progress_bar(settings.progress, n_items, "index: add items", "item") as add_bar:
            index = build_index(
                emb.item_vectors,
                seed=settings.seed,
                on_added=None if add_bar is None else add_bar.update,
            )
        rng = np.random.default_rng(settings.seed)
        known = np.flatnonzero(np.abs(emb.user_vectors).sum(axis=1) > 0)
        probe_rows = rng.choice(known, size=min(256, known.size), replace=False)
        report.index_version = save_index_version(
            root,
            index,
            emb.item_vectors,
            np.ascontiguousarray(emb.user_vectors[np.sort(probe_rows)]),
            features_version=report.features_version,
            k=INDEX_RECALL_K,
            target_recall=INDEX_TARGET_RECALL,
        )
        manifest = artifacts.read_manifest(root.indexes / report.index_version)
        report.index_recall = float(manifest.get("recall", 0.0))
        report.index_nlist = int(manifest.get("nlist", 0))
        report.index_nprobe = int(manifest.get("default_nprobe", 0))

    with _stage("ranker", report, say, bar):
        params = RankerParams(seed=settings.seed)
        trained = train_ranker(world, tables, params, progress=progress)
        report.model_version = save_model_version(
            root,
            "ranker",
            trained,
            tables,
            features_version=report.features_version,
            world_version=report.world_version,
            params=params,
        )
        report.offline_metrics = dict(trained.metrics)
        # Validate as a server will, and compile it now (cached under compiled/) so servers
        # on this machine start scoring with native code without compiling.
        _, engine = load_for_serving(root, "ranker", report.model_version)
        say(f"  ranker engine: {engine}")

    with _stage("control", report, say, bar):
        publish_control_documents(root, report)


def publish_control_documents(root: ArtifactRoot, report: BuildReport) -> None:
    """Route serving to the new versions; create default experiments and availability once."""
    from experiments.assignment import default_config
    from recsys.control.store import AVAILABILITY, EXPERIMENTS, ROUTING, open_store

    store = open_store("", root.path)
    try:
        routing = store.read(ROUTING)
        body: dict[str, Any] = {
            "index": report.index_version,
            "models": {"ranker": {"production": report.model_version}},
        }
        if routing is None or routing.body != body:
            store.write(
                ROUTING, body, expected_version=routing.version if routing else 0, author="build"
            )
        if store.read(EXPERIMENTS) is None:
            store.write(EXPERIMENTS, default_config(), expected_version=0, author="build")
        if store.read(AVAILABILITY) is None:
            store.write(
                AVAILABILITY,
                {"skus_off": [], "restaurants_off": []},
                expected_version=0,
                author="build",
            )
    finally:
        store.close()


def is_built(root: Path) -> bool:
    return (root / "control").is_dir() and bool(artifacts.versions(root / "indexes"))


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "build",
        help="build the demo world, vectors, index and ranker into an artifact root",
        description="Build the demo world and every serving artifact (deterministic from --seed).",
    )
    d = BuildSettings()
    p.add_argument(
        "--out",
        type=Path,
        default=Path(env_default("artifacts", str(DEFAULT_ARTIFACTS))),
        help="artifact root to write (env RECSYS_ARTIFACTS; default %(default)s)",
    )
    p.add_argument("--skus", type=int, default=d.skus, help="catalogue size (default %(default)s)")
    p.add_argument("--users", type=int, default=d.users, help="users (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (default %(default)s)")
    p.add_argument("--dim", type=int, default=d.dim, help="vector dimension (default %(default)s)")
    p.add_argument(
        "--if-missing",
        action="store_true",
        help="do nothing when --out already holds a built world",
    )
    p.add_argument("--json", action="store_true", help="print the build report as JSON at the end")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from recsys.cli import CliError

    for name, minimum in (("skus", 100), ("users", 50), ("dim", 4)):
        if getattr(args, name) < minimum:
            raise CliError(f"--{name}: expected at least {minimum}, got {getattr(args, name)}")
    if args.if_missing and is_built(args.out):
        print(f"recsys build: {args.out} already built; skipping (drop --if-missing to rebuild)")
        return 0
    settings = BuildSettings(
        out=args.out, skus=args.skus, users=args.users, seed=args.seed, dim=args.dim
    )
    from tqdm import tqdm

    # tqdm.write prints above the progress bars instead of through them.
    report = build(settings, say=lambda msg: tqdm.write(msg, file=sys.stderr))
    print(f"world     {report.world_version}")
    print(f"features  {report.features_version}")
    print(
        f"index     {report.index_version}  (nlist {report.index_nlist}, default nprobe "
        f"{report.index_nprobe}: recall@{INDEX_RECALL_K} vs exact {report.index_recall:.3f})"
    )
    print(f"ranker    {report.model_version}")
    for key, value in sorted(report.offline_metrics.items()):
        print(f"  {key:28s} {value:.4f}")
    print(
        f"took {report.seconds['total']:.1f}s, {report.bytes_on_disk / 1e6:.1f} MB on disk, "
        f"peak RSS {report.peak_rss_mb:.0f} MB"
    )
    if args.json:
        print(json.dumps(asdict(report), sort_keys=True))
    return 0
