"""`recsys models`: list, show, train, register, gates, promote, canary, rollback, retire,
history, decisions.

Routing changes are validated (the version loads, fits the feature schema, reproduces its golden
scores, scores no NaN, fits the latency budget) before they are written; ``promote`` and
``canary`` also run the gates of the promotion policy (the challenger against production on the
same held-out sessions, per slice; a replay over the exposure log; the infra budget). A refusal
prints the failing checks with their numbers and exits 2, and the routing document is left as it
was; ``--force`` overrides and is recorded in the routing and decision histories. Servers follow
the document (serving/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recsys.artifacts import ArtifactRoot
from recsys.cli.common import (
    CliError,
    control_plane_arguments,
    parse_time,
    redis_auth,
    tracking_arguments,
    tracking_settings,
)
from recsys.cli.exposures import log_directory
from recsys.control.backends import open_store
from recsys.control.store import ROUTING, Document, StoreError
from recsys.outcomes.sinks import default_outcome_dir
from recsys.pipeline.archive import snapshot_directory
from recsys.promotion.controller import CanaryController, LogSources
from recsys.promotion.gates import GateReport
from recsys.promotion.judge import LoggedTraffic, guarded, run_gates
from recsys.promotion.policy import load_policy
from recsys.promotion.retrain import retrain
from recsys.promotion.sequential import MixtureSPRT
from recsys.promotion.tracking import Tracker, TrackingError, open_tracker
from recsys.ranking.registry import LATENCY_BUDGET_US_PER_ROW, ModelRegistry, RegistryError
from recsys.settings import env_default

DEFAULT_NAME = "ranker"


def add_parser(subparsers: Any) -> None:
    common = control_plane_arguments()
    common.add_argument(
        "--author",
        default=os.environ.get("USER") or "ops",
        help="who makes the change, for the routing history (default: $USER or ops)",
    )
    common.add_argument(
        "--latency-budget-us",
        type=float,
        default=LATENCY_BUDGET_US_PER_ROW,
        help="validation: max µs per row on a warm-up batch (default %(default)s)",
    )
    common.add_argument(
        "--no-compile",
        action="store_true",
        help="validate with LightGBM only (skip compiling with lleaves)",
    )

    tracking = tracking_arguments()
    parser = subparsers.add_parser(
        "models", help="model versions and their routing", description=__doc__
    )
    sub = parser.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str) -> Any:
        p = sub.add_parser(name, help=help_, description=help_, parents=[common, tracking])
        p.set_defaults(func=func)
        return p

    p = add("list", cmd_list, "versions of a model with their roles and offline NDCG")
    p.add_argument("name", nargs="?", default=None, help="model name (default: all)")
    p = add("show", cmd_show, "a version's manifest (JSON; golden rows and baseline summarised)")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--full", action="store_true", help="the whole manifest")
    p = add("train", cmd_train, "train a version on the world's logs and register it")
    p.add_argument("--name", default=DEFAULT_NAME)
    p.add_argument("--seed", type=int, default=None)
    p = add(
        "retrain",
        cmd_retrain,
        "train a challenger on logged exposures joined with outcomes and register its lineage",
    )
    p.add_argument("--name", default=DEFAULT_NAME)
    p.add_argument("--since", required=True, help="window start (ISO time or epoch seconds)")
    p.add_argument("--until", default="", help="window end (default: now)")
    p.add_argument(
        "--exposures",
        type=Path,
        help="exposure log (default: $RECSYS_EXPOSURE_DIR, else exposures/ beside the root)",
    )
    p.add_argument(
        "--outcomes", type=Path, help="outcome events (default: outcomes/ beside the root)"
    )
    p.add_argument("--late-seconds", type=float, default=600.0, help="join window for late events")
    p.add_argument("--policy", type=Path, default=None, help="policy for the gate report")
    p.add_argument("--shuffle-labels", action="store_true", help=argparse.SUPPRESS)
    p = add("register", cmd_register, "validate and register a LightGBM model trained elsewhere")
    p.add_argument("--name", default=DEFAULT_NAME)
    p.add_argument("--model-file", type=Path, required=True)
    p = add("gates", cmd_gates, "run the gates (offline vs production, replay, infra) on VERSION")
    p.add_argument("name")
    p.add_argument("version")
    _gate_arguments(p, force=False)
    p = add("promote", cmd_promote, "route all traffic to VERSION (old production kept loaded)")
    p.add_argument("name")
    p.add_argument("version")
    _gate_arguments(p, force=True)
    p = add("canary", cmd_canary, "route PERCENT of users (by hash) to VERSION; 0 ends it")
    p.add_argument("name")
    p.add_argument("version")
    p.add_argument("--percent", type=float, required=True)
    _gate_arguments(p, force=True)
    p.add_argument(
        "--analyze",
        action="store_true",
        help="then judge the canary on live traffic (sequential test, guardrails) and ramp, "
        "promote or roll it back",
    )
    p.add_argument("--outcomes", type=Path, help="outcome events (default: beside the root)")
    p.add_argument("--late-seconds", type=float, default=600.0, help="join window (s)")
    p.add_argument("--look-seconds", type=float, default=30.0, help="between looks (s)")
    p.add_argument("--max-minutes", type=float, default=120.0, help="give up after (min)")
    p.add_argument(
        "--metrics-url", default="", help="a server's /metrics, for the error and p99 guardrails"
    )
    p = add("rollback", cmd_rollback, "production back to the previous version")
    p.add_argument("name")
    p = add("retire", cmd_retire, "delete a version no route or experiment arm uses")
    p.add_argument("name")
    p.add_argument("version")
    p = add("history", cmd_history, "routing changes, newest first")
    p.add_argument("--limit", type=int, default=20)
    p = add("decisions", cmd_decisions, "decision records of a model (gates, canary), newest first")
    p.add_argument("name")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true", help="the whole records, one JSON per line")


def _gate_arguments(p: argparse.ArgumentParser, *, force: bool) -> None:
    p.add_argument(
        "--policy",
        type=Path,
        default=Path(env_default("policy", "")) if env_default("policy", "") else None,
        help="promotion policy file (TOML; default: $RECSYS_POLICY, else the built-in policy)",
    )
    p.add_argument(
        "--exposures",
        type=Path,
        help="exposure log the replay gate runs the challenger over (default: "
        "$RECSYS_EXPOSURE_DIR, else exposures/ beside the artifact root, if it exists)",
    )
    if force:
        p.add_argument(
            "--force",
            action="store_true",
            help="change the routing even if a gate fails (recorded in the history)",
        )


def _registry(args: argparse.Namespace) -> ModelRegistry:
    if not args.artifacts.is_dir():
        raise CliError(f"--artifacts {args.artifacts}: no such directory; run `recsys build`")
    try:
        store = open_store(
            args.control, args.artifacts, prefix=args.control_prefix, auth=redis_auth(args)
        )
    except StoreError as e:
        raise CliError(str(e)) from e
    return ModelRegistry(
        ArtifactRoot(args.artifacts),
        store,
        author=args.author,
        latency_budget_us=args.latency_budget_us,
        compile_models=not args.no_compile,
    )


def _run(args: argparse.Namespace, action: Callable[[ModelRegistry], int]) -> int:
    registry = _registry(args)
    try:
        return action(registry)
    except RegistryError as e:
        raise CliError(str(e)) from e
    finally:
        registry.store.close()


def _warn(message: str) -> None:
    print(f"recsys: warning: {message}", file=sys.stderr)


class _Tracking:
    """The command's MLflow tracker, opened on first use. Tracking follows the registry (the
    source of truth), so a failure is a warning: the registry change it mirrors is made."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.settings = tracking_settings(args, args.artifacts)
        self._tracker: Tracker | None = None
        self._opened = False

    def __call__(self, step: Callable[[Tracker], object]) -> None:
        try:
            if not self._opened:
                self._opened = True
                self._tracker = open_tracker(self.settings, _warn)
            if self._tracker is not None:
                step(self._tracker)
        except TrackingError as e:
            _warn(f"{e} (the registry is unchanged by this; rerun to track)")

    def routing(self, registry: ModelRegistry, name: str) -> None:
        """Aliases champion/challenger as the routing now says."""
        table, _ = registry.routing()
        route = table.models.get(name)
        if route is not None:
            self(lambda t: t.sync_aliases(registry.root, name, route.production, route.canary))

    def decisions(
        self, registry: ModelRegistry, name: str
    ) -> Callable[[str, dict[str, Any]], None]:
        def log(version: str, entry: dict[str, Any]) -> None:
            self(lambda t: t.log_decision(registry.root, name, version, entry))

        return log


def _routed(document: Document, name: str) -> str:
    route = document.body["models"][name]
    parts = [f"production {route['production']}"]
    if route.get("canary"):
        parts.append(f"canary {route['canary']['version']} {route['canary']['percent']:g}%")
    if route.get("previous"):
        parts.append(f"previous {route['previous']}")
    return f"routing version {document.version}: {name} " + ", ".join(parts)


def cmd_list(args: argparse.Namespace) -> int:
    def action(registry: ModelRegistry) -> int:
        names = [args.name] if args.name else registry.names()
        listed = [(name, registry.list(name)) for name in names]  # refuses a bad name first
        for name, infos in listed:
            print(f"{name}:")
            for info in infos:
                ndcg = next(
                    (v for k, v in info.metrics.items() if k.endswith(".ranker")), float("nan")
                )
                created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(info.created_at))
                roles = ", ".join(info.roles) or "-"
                print(
                    f"  {info.version}  {created}  trees {info.num_trees:4d}  "
                    f"ndcg {ndcg:.4f}  {roles}"
                )
        return 0

    return _run(args, action)


def cmd_show(args: argparse.Namespace) -> int:
    def action(registry: ModelRegistry) -> int:
        manifest = registry.manifest(args.name, args.version)
        if not args.full:
            golden = manifest.get("golden", {})
            manifest["golden"] = {
                "rows": len(golden.get("features", [])),
                "tolerance": golden.get("tolerance"),
            }
            baseline = manifest.get("baseline", {})
            manifest["baseline"] = {"features": sorted(baseline.get("features", {}))}
        manifest["roles"] = registry.roles(args.name).get(args.version, [])
        print(json.dumps(manifest, indent=2, sort_keys=True))
        return 0

    return _run(args, action)


def cmd_train(args: argparse.Namespace) -> int:
    def action(registry: ModelRegistry) -> int:
        registry.check_registrable(args.name)  # before minutes of training
        print(f"training {args.name} on {args.artifacts} ...", file=sys.stderr, flush=True)
        version = registry.train(args.name, args.seed)
        _print_version(registry, args.name, version)
        _Tracking(args)(lambda t: t.log_version(registry.root, args.name, version, "train"))
        print(version)
        return 0

    return _run(args, action)


def cmd_retrain(args: argparse.Namespace) -> int:
    since = parse_time(args.since, "--since")
    until = parse_time(args.until, "--until") if args.until else time.time()
    if until <= since:
        raise CliError(f"--until {args.until}: expected a time after --since {args.since}")
    exposures = log_directory(args.exposures, args.artifacts)
    outcomes = args.outcomes or default_outcome_dir(args.artifacts)

    def action(registry: ModelRegistry) -> int:
        registry.check_registrable(args.name)
        print(f"retraining {args.name} on {exposures} x {outcomes} ...", file=sys.stderr)
        result = retrain(
            registry,
            args.name,
            exposures=exposures,
            outcomes=outcomes,
            since=since,
            until=until,
            late_seconds=args.late_seconds,
            shuffle_labels=args.shuffle_labels,
        )
        lineage = result.lineage
        print(
            f"registered {args.name}/{result.version} from {lineage['join']['requests_used']:,} "
            f"logged requests ({lineage['join']['rows_used']:,} impressed rows); parent "
            f"{lineage['parent_version'] or '-'}; exposures sha256 "
            f"{lineage['exposures']['sha256'][:12]}, outcomes sha256 "
            f"{lineage['outcomes']['sha256'][:12]}",
            file=sys.stderr,
        )
        _Tracking(args)(
            lambda t: t.log_version(
                registry.root, args.name, result.version, "retrain", lineage=lineage
            )
        )
        report = run_gates(
            registry,
            args.name,
            result.version,
            load_policy(args.policy),
            eval_set=result.data.eval_set(),
        )
        print("\n".join(report.lines()), file=sys.stderr)
        print(result.version)
        return 0

    return _run(args, action)


def cmd_register(args: argparse.Namespace) -> int:
    def action(registry: ModelRegistry) -> int:
        version = registry.register(args.name, args.model_file)
        _print_version(registry, args.name, version)
        _Tracking(args)(lambda t: t.log_version(registry.root, args.name, version, "register"))
        print(version)
        return 0

    return _run(args, action)


def _print_version(registry: ModelRegistry, name: str, version: str) -> None:
    model, engine = registry.validate(name, version)
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(model.metrics.items()) if "@" in k)
    print(f"registered {name}/{version}: {model.booster.num_trees()} trees; {metrics}")
    print(f"validated: schema, golden scores, no NaN, latency; engine {engine}")


def _gates(args: argparse.Namespace, registry: ModelRegistry) -> GateReport:
    policy = load_policy(args.policy)
    exposures = log_directory(args.exposures, args.artifacts)
    traffic = (
        LoggedTraffic(exposures, snapshot_directory(exposures)) if exposures.is_dir() else None
    )
    print(f"gates: {args.name}/{args.version}, {policy.label()} ...", file=sys.stderr, flush=True)
    return run_gates(registry, args.name, args.version, policy, traffic=traffic)


def cmd_gates(args: argparse.Namespace) -> int:
    def action(registry: ModelRegistry) -> int:
        report = _gates(args, registry)
        print("\n".join(report.lines()))
        return 0 if report.passed else 1

    return _run(args, action)


def cmd_promote(args: argparse.Namespace) -> int:
    def action(registry: ModelRegistry) -> int:
        registry.validate(args.name, args.version)  # a broken version: refused before the gates
        report = _gates(args, registry)
        tracking = _Tracking(args)
        document = guarded(
            registry,
            report,
            f"promote {args.name}/{args.version}",
            lambda note: registry.promote(args.name, args.version, note=note),
            force=args.force,
            on_record=tracking.decisions(registry, args.name),
        )
        tracking.routing(registry, args.name)
        print("\n".join(report.lines()), file=sys.stderr)
        print(_routed(document, args.name))
        return 0

    return _run(args, action)


def cmd_canary(args: argparse.Namespace) -> int:
    def action(registry: ModelRegistry) -> int:
        if args.percent == 0:  # ending a canary needs no gate
            print(_routed(registry.canary(args.name, args.version, 0), args.name))
            _Tracking(args).routing(registry, args.name)
            return 0
        registry.validate(args.name, args.version)
        report = _gates(args, registry)
        tracking = _Tracking(args)
        document = guarded(
            registry,
            report,
            f"canary {args.name}/{args.version} {args.percent:g}%",
            lambda note: registry.canary(args.name, args.version, args.percent, note=note),
            force=args.force,
            on_record=tracking.decisions(registry, args.name),
        )
        tracking.routing(registry, args.name)
        print("\n".join(report.lines()), file=sys.stderr)
        print(_routed(document, args.name))
        if args.analyze:
            return _analyze(args, registry, tracking)
        return 0

    return _run(args, action)


def _analyze(args: argparse.Namespace, registry: ModelRegistry, tracking: _Tracking) -> int:
    exposures = log_directory(args.exposures, args.artifacts)
    sources = LogSources(
        exposures=exposures,
        outcomes=args.outcomes or default_outcome_dir(args.artifacts),
        late_seconds=args.late_seconds,
        metrics_url=args.metrics_url,
    )
    policy = load_policy(args.policy)
    controller = CanaryController(
        registry, policy.canary, sources, on_record=tracking.decisions(registry, args.name)
    )
    state = controller.begin(args.name, args.version, args.percent)
    print(f"analysing: {MixtureSPRT(policy.canary.alpha, policy.canary.margin).describe()}")
    state, decision = controller.run(
        state,
        look_seconds=args.look_seconds,
        max_seconds=args.max_minutes * 60,
        say=lambda d: print(d.line(), flush=True),
    )
    tracking.routing(registry, args.name)
    print(f"{decision.action}: {decision.reason}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    def action(registry: ModelRegistry) -> int:
        print(_routed(registry.rollback(args.name), args.name))
        _Tracking(args).routing(registry, args.name)
        return 0

    return _run(args, action)


def cmd_retire(args: argparse.Namespace) -> int:
    def action(registry: ModelRegistry) -> int:
        registry.retire(args.name, args.version)
        print(f"retired {args.name}/{args.version}")
        return 0

    return _run(args, action)


def cmd_decisions(args: argparse.Namespace) -> int:
    def action(registry: ModelRegistry) -> int:
        for entry in registry.decisions(args.name, limit=args.limit):
            if args.json:
                print(json.dumps(entry, sort_keys=True))
                continue
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(entry.get("ts", 0))))
            gates = entry.get("gates") or {}
            failed = [
                f"{c['gate']} {c['name']}"
                for c in gates.get("checks", [])
                if c.get("gated") and not c.get("passed")
            ]
            detail = f"  failed: {', '.join(failed)}" if failed else ""
            print(
                f"{when}  {entry.get('author', '?')}  {entry.get('decision', '?')}  "
                f"{entry.get('action', '')}{detail}"
            )
        return 0

    return _run(args, action)


def cmd_history(args: argparse.Namespace) -> int:
    def action(registry: ModelRegistry) -> int:
        try:
            entries = registry.store.history(ROUTING, limit=args.limit)
        except StoreError as e:
            raise RegistryError(str(e)) from e
        for entry in entries:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(entry.updated_at))
            print(f"v{entry.version}  {when}  {entry.author}")
            for change in entry.changes:
                print(f"    {change}")
        return 0

    return _run(args, action)
