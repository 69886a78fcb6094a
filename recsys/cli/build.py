"""`recsys build`: the demo world and every serving artifact, deterministic from --seed."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from recsys.artifacts import ArtifactRoot
from recsys.build import INDEX_RECALL_K, build, is_built
from recsys.cli.common import CliError, tracking_arguments, tracking_settings
from recsys.promotion.tracking import TrackingError, open_tracker
from recsys.settings import DEFAULT_ARTIFACTS, BuildSettings, env_default


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "build",
        parents=[tracking_arguments()],
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
    by_k = report.index_filtered_recall_by_k
    filtered = (
        ""
        if report.index_filtered_recall is None
        else f", {report.index_filtered_recall:.3f} with the delivery filter; by depth "
        + ", ".join(
            f"K={k} nprobe {report.index_nprobe_by_k.get(k, report.index_nprobe)}: {r:.3f}"
            for k, r in by_k.items()
        )
    )
    print(
        f"index     {report.index_version}  (nlist {report.index_nlist}, default nprobe "
        f"{report.index_nprobe}: recall@{INDEX_RECALL_K} vs exact {report.index_recall:.3f}"
        f"{filtered})"
    )
    print(f"ranker    {report.model_version}")
    for key, value in sorted(report.offline_metrics.items()):
        print(f"  {key:28s} {value:.4f}")
    print(
        f"took {report.seconds['total']:.1f}s, {report.bytes_on_disk / 1e6:.1f} MB on disk, "
        f"peak RSS {report.peak_rss_mb:.0f} MB"
    )
    _track(args, report.model_version)
    if args.json:
        print(json.dumps(asdict(report), sort_keys=True))
    return 0


def _track(args: argparse.Namespace, version: str) -> None:
    """The build's ranker as an MLflow run and model version, alias champion (it serves)."""

    def warn(message: str) -> None:
        print(f"recsys: warning: {message}", file=sys.stderr)

    root = ArtifactRoot(args.out)
    try:
        tracker = open_tracker(tracking_settings(args, args.out), warn)
        if tracker is not None:
            tracker.log_version(root, "ranker", version, "build")
            tracker.sync_aliases(root, "ranker", version)
            print(f"tracked   {tracker.uri}")
    except TrackingError as e:
        warn(f"{e} (the build is complete; rerun `recsys models promote` to track)")
