"""`recsys replay`: re-run a logged request on the snapshot that served it, or diff a challenger.

recsys replay REQUEST_ID [--explain] [--json]
recsys replay --sample N --against MODEL_VERSION [--since T] [--until T] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from typing import Any

from recsys.cli.common import CliError, parse_time
from recsys.cli.exposures import log_directory, log_directory_arguments
from recsys.pipeline.archive import snapshot_directory
from recsys.replay import (
    SCORE_TOLERANCE,
    LoggedRequest,
    Replayer,
    diff_against,
    find_record,
    iter_records,
)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "replay",
        parents=[log_directory_arguments()],
        help="re-run a logged request exactly, or diff a challenger model over logged traffic",
        description="Rebuild a logged request's serving snapshot from the artifact root and the "
        "snapshot's manifest, re-run it with the logged feature row and compare.",
    )
    p.add_argument("request_id", nargs="?", help="the request to replay")
    p.add_argument(
        "--explain", action="store_true", help="each served item's feature contributions"
    )
    p.add_argument(
        "--sample", type=int, default=0, help="replay N logged requests (with --against)"
    )
    p.add_argument("--against", default="", help="challenger model version for --sample")
    p.add_argument("--model", default="ranker", help="model name of the challenger")
    p.add_argument("--since", default="", help="only requests at or after T (ISO time or epoch s)")
    p.add_argument("--until", default="", help="only requests before T (ISO time or epoch s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_replay)


def run_replay(args: argparse.Namespace) -> int:
    directory = log_directory(args.exposures, args.artifacts)
    replayer = Replayer(args.artifacts, snapshot_directory(directory))
    if args.sample or args.against:
        return _diff(args, directory, replayer)
    if not args.request_id:
        raise CliError("replay: give a REQUEST_ID, or --sample N --against MODEL_VERSION")
    logged = LoggedRequest.parse(find_record(directory, args.request_id))
    if args.explain:
        explained = replayer.explain(logged)
        print(json.dumps(explained, indent=2) if args.json else _explain_table(explained))
        return 0
    replayed = replayer.replay(logged)
    difference = replayed.max_score_difference
    if args.json:
        print(
            json.dumps(
                {
                    "request_id": logged.request.request_id,
                    "snapshot_id": logged.snapshot_id,
                    "model_version": replayed.model_version,
                    "reproduced": replayed.reproduced,
                    "exact": replayed.exact,
                    "max_score_difference": difference,
                    "tolerance": SCORE_TOLERANCE,
                    "logged": {"sku_ids": logged.sku_ids, "scores": logged.scores},
                    "replayed": {"sku_ids": replayed.sku_ids, "scores": replayed.scores},
                }
            )
        )
    else:
        print(
            f"request {logged.request.request_id}  user {logged.request.user_id}  "
            f"snapshot {logged.snapshot_id}  model {logged.model_version}"
        )
        print(f"{'rank':>4}  {'logged sku':>10}  {'logged score':>14}  {'replayed':>10}  score")
        for rank, (a, sa, b, sb) in enumerate(
            zip(logged.sku_ids, logged.scores, replayed.sku_ids, replayed.scores, strict=False),
            start=1,
        ):
            mark = "" if a == b and sa == sb else "  <- differs"
            print(f"{rank:>4}  {a:>10}  {sa:>14.8f}  {b:>10}  {sb:.8f}{mark}")
        verdict = (
            "reproduced exactly"
            if replayed.exact
            else f"reproduced within {SCORE_TOLERANCE:g}"
            if replayed.reproduced
            else "NOT reproduced"
        )
        same = sum(a == b for a, b in zip(logged.sku_ids, replayed.sku_ids, strict=False))
        print(
            f"{verdict}: {same}"
            f" of {len(logged.sku_ids)} items the same, max score difference {difference:.3g} "
            f"(tolerance {SCORE_TOLERANCE:g}); arms "
            f"{'the same' if replayed.exposures == logged.exposures else 'differ'}"
        )
    return 0 if replayed.reproduced else 1


def _explain_table(explained: list[dict[str, Any]]) -> str:
    lines = []
    for item in explained:
        top = ", ".join(
            f"{c['feature']}={c['value']:.3g} ({c['contribution']:+.3f})"
            for c in item["contributions"][:5]
        )
        lines.append(
            f"{item['rank']:>3}  sku {item['sku_id']:>8}  score {item['score']:.4f}  "
            f"bias {item['bias']:+.3f}  {top}"
        )
    return "\n".join(lines)


def _diff(args: argparse.Namespace, directory: Path, replayer: Replayer) -> int:
    if not args.against or args.sample < 1:
        raise CliError("replay: --sample N (N >= 1) and --against MODEL_VERSION go together")
    since = parse_time(args.since, "--since") if args.since else -math.inf
    until = parse_time(args.until, "--until") if args.until else math.inf
    records = [
        r
        for r in iter_records(directory)
        if since <= float(r.get("ts", 0.0)) < until and r.get("snapshot_id")
    ]
    if not records:
        raise CliError(f"{directory}: no replayable exposure records in that window")
    chosen = random.Random(args.seed).sample(records, min(args.sample, len(records)))
    logged = [LoggedRequest.parse(r) for r in chosen]
    report = diff_against(replayer, logged, args.model, args.against)
    if args.json:
        print(json.dumps({"against": args.against, "slices": report}, sort_keys=True))
        return 0
    print(f"{len(logged)} logged requests against {args.model}/{args.against}")
    print(f"{'slice':<40} {'n':>5} {'overlap':>8} {'changed':>8} {'tau':>7} {'shift':>8}")
    for group, by_key in report.items():
        for key, s in by_key.items():
            print(
                f"{group + ':' + key:<40} {s['requests']:>5.0f} {s['top_k_overlap']:>8.3f} "
                f"{s['changed_share']:>8.3f} {s['kendall_tau']:>7.3f} "
                f"{s['mean_score_shift']:>+8.4f}"
            )
    return 0
