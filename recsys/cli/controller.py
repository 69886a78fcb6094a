"""`recsys controller`: the retraining loop's controller as a long-running process (a fleet runs
it as its own Deployment, deploy/controller.yaml).

Every ``--look-seconds`` it follows the control plane (``--control``, as the ``models``
commands do) and the registry on the shared artifact volume, and reads the archived exposure
records and outcome events (``--exposures DIR --outcomes DIR``: the files ``recsys exposures
archive`` writes). Each model with an active canary (started by ``recsys models canary``, by this
controller, or before a restart) is judged by the canary analysis and ramped, promoted or rolled
back; with ``--retrain`` it also watches production's click-through rate for drift, retrains a
challenger from the archive, gates it and starts its canary (recsys/promotion/loop.py, the same
code as ``recsys loop``). Every decision goes into the registry's decision history and MLflow.

With a Redis control plane only the holder of a lease (``SET NX PX`` on ``--lease-key``, renewed
every third of ``--lease-seconds``) acts, so two replicas never change the routing at once; with
the file store there is no lease (run one controller per artifact root). SIGTERM or SIGINT:
the current look finishes or stops before its next routing change, then the process exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import start_http_server

from recsys.artifacts import ArtifactRoot
from recsys.cli.common import (
    CliError,
    control_plane_arguments,
    redis_auth,
    tracking_arguments,
    tracking_settings,
)
from recsys.control.backends import open_store
from recsys.control.redis_auth import redis_client
from recsys.control.store import StoreError
from recsys.promotion.canary import ACTIONS
from recsys.promotion.controller import LogSources
from recsys.promotion.lease import RedisLease
from recsys.promotion.loop import LoopController, LoopSettings
from recsys.promotion.policy import load_policy
from recsys.promotion.tracking import Tracker, TrackingError, open_tracker
from recsys.ranking.registry import ModelRegistry, RegistryError
from recsys.settings import env_default

DECISION_ACTIONS = (*ACTIONS, "canary", "refused")
"""The ``action`` label of ``recsys_controller_decisions_total``: the canary analysis's
decisions, a canary started after the gates passed (or forced), a challenger refused."""


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "controller",
        parents=[control_plane_arguments(), tracking_arguments()],
        help="judge canaries (and with --retrain, retrain on drift) from the archived logs, "
        "long-running",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--exposures", type=Path, required=True, help="archived exposure records (directory)"
    )
    p.add_argument("--outcomes", type=Path, required=True, help="archived outcome events")
    p.add_argument("--policy", type=Path, default=None, help="promotion policy (TOML)")
    p.add_argument("--look-seconds", type=float, default=30.0, help="between looks (s)")
    p.add_argument(
        "--late-seconds",
        type=float,
        default=600.0,
        help="join window: a request is judged once its outcomes can no longer arrive (s)",
    )
    p.add_argument("--retrain", action="store_true", help="also watch for drift and retrain")
    p.add_argument("--name", default="ranker", help="the model --retrain watches")
    p.add_argument("--window-requests", type=int, default=1500, help="drift monitor window")
    p.add_argument(
        "--retrain-requests", type=int, default=6000, help="logged requests before retraining"
    )
    p.add_argument(
        "--lease-key", default="", help="Redis key of the lease (default: <prefix>controller:lease)"
    )
    p.add_argument("--lease-seconds", type=float, default=30.0, help="the lease's time to live")
    p.add_argument(
        "--metrics-host",
        default=env_default("metrics_host", "127.0.0.1"),
        help="address of /metrics (RECSYS_METRICS_HOST; default %(default)s: the loopback)",
    )
    p.add_argument(
        "--metrics-port",
        default=env_default("metrics_port", "0", flag="--metrics-port"),
        help="port of /metrics (RECSYS_METRICS_PORT; default 0: no /metrics)",
    )
    p.add_argument(
        "--author", default="recsys controller", help="who changes the routing, for its history"
    )
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="validate versions with LightGBM only (each serving pod compiles for its node)",
    )
    p.set_defaults(func=_run)


def _checked(args: argparse.Namespace) -> int:
    """The flags a parser type cannot check; returns the metrics port."""
    for flag in ("look_seconds", "lease_seconds"):
        if not getattr(args, flag) > 0:
            raise CliError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected > 0")
    if not args.late_seconds >= 0:
        raise CliError(f"--late-seconds {args.late_seconds}: expected >= 0")
    for flag in ("window_requests", "retrain_requests"):
        if getattr(args, flag) < 1:
            raise CliError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected >= 1")
    try:
        port = int(args.metrics_port)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise CliError(f"--metrics-port {args.metrics_port!r}: expected a port, 0..65535")
    if not (args.artifacts / "models").is_dir():
        raise CliError(f"--artifacts {args.artifacts}: no model registry there")
    return port


class ControllerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.looks = Counter(
            "recsys_controller_looks", "Looks taken (while holding the lease).",
            registry=self.registry,
        )  # fmt: skip
        self.failed_looks = Counter(
            "recsys_controller_failed_looks",
            "Looks that failed (control plane or registry unreadable); the next look retries.",
            registry=self.registry,
        )
        self.decisions = Counter(
            "recsys_controller_decisions",
            "Decisions by action: continue, ramp, promote, rollback (canary analysis), canary "
            "(a canary started), refused (a challenger the gates refused).",
            ["action"],
            registry=self.registry,
        )
        for action in DECISION_ACTIONS:
            self.decisions.labels(action)
        self.last_look = Gauge(
            "recsys_controller_last_look_timestamp_seconds",
            "When the last look ended (Unix time).",
            registry=self.registry,
        )
        self.lease_held = Gauge(
            "recsys_controller_lease_held",
            "1 while this replica holds the lease and acts (also 1 with the file store: no lease).",
            registry=self.registry,
        )


@contextlib.contextmanager
def _metrics_server(metrics: ControllerMetrics, host: str, port: int) -> Iterator[None]:
    if port == 0:
        yield
        return
    try:
        server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as e:
        raise CliError(f"--metrics-port {port}: cannot listen on {host}:{port} ({e})") from e
    _log(f"/metrics on {host}:{server.server_port}")
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _log(text: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"{stamp} controller: {text}", flush=True)


def _run(args: argparse.Namespace) -> int:
    port = _checked(args)
    policy = load_policy(args.policy)
    auth = redis_auth(args)
    store = open_store(args.control, args.artifacts, prefix=args.control_prefix, auth=auth)
    registry = ModelRegistry(
        ArtifactRoot(args.artifacts),
        store,
        author=args.author,
        compile_models=not args.no_compile,
    )
    lease = None
    if args.control.startswith(("redis://", "rediss://")):
        key = args.lease_key or f"{args.control_prefix}controller:lease"
        client = redis_client(args.control, auth, socket_timeout=5.0, socket_connect_timeout=5.0)
        lease = RedisLease(client, key, args.lease_seconds)
    else:
        _log("file control store: no lease; run one controller per artifact root")
    tracker: Tracker | None = None
    with contextlib.suppress(TrackingError):
        tracker = open_tracker(tracking_settings(args, args.artifacts), _log)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        _log(f"{signal.Signals(signum).name}: stopping after this look")
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    metrics = ControllerMetrics()
    sources = LogSources(args.exposures, args.outcomes, late_seconds=args.late_seconds)
    changed: list[str] = []

    def on_decision(action: str) -> None:
        metrics.decisions.labels(action).inc()
        if action != "continue":
            changed.append(action)

    controller = LoopController(
        registry,
        policy,
        sources,
        LoopSettings(
            name=args.name,
            retrain=args.retrain,
            window_requests=args.window_requests,
            retrain_requests=args.retrain_requests,
        ),
        say=lambda text, _mark: _log(text),
        tracker=tracker,
        stopping=lambda: stop.is_set() or (lease is not None and not lease.held),
        on_decision=on_decision,
    )
    _log(
        f"control plane {args.control or 'file'}, registry {args.artifacts}, exposures "
        f"{args.exposures}, outcomes {args.outcomes}, looks every {args.look_seconds:g}s, "
        f"retrain {'on' if args.retrain else 'off'}, {policy.label()}"
    )
    try:
        with _metrics_server(metrics, args.metrics_host, port):
            _looks(controller, lease, metrics, stop, args.look_seconds, tracker, changed)
    finally:
        if lease is not None:
            lease.release()
            lease.client.close()
        store.close()
    _log("stopped")
    return 0


def _looks(
    controller: LoopController,
    lease: RedisLease | None,
    metrics: ControllerMetrics,
    stop: threading.Event,
    look_seconds: float,
    tracker: Tracker | None,
    changed: list[str],
) -> None:
    held: bool | None = None
    if lease is not None:
        lease.try_acquire()
        lease.start_renewing()
    while not stop.is_set():
        now_held = lease is None or lease.held
        metrics.lease_held.set(1.0 if now_held else 0.0)
        if now_held != held:
            holder = "" if lease is None or now_held else f" (held by {_holder(lease)})"
            _log(f"lease {'held: acting' if now_held else 'not held: standing by'}{holder}")
            held = now_held
        if now_held:
            try:
                controller.look()
                metrics.looks.inc()
            except (RegistryError, StoreError, OSError) as e:
                metrics.failed_looks.inc()
                _log(f"look failed, retrying at the next: {e}")
            metrics.last_look.set(time.time())
            if changed and tracker is not None:
                changed.clear()
                _sync_aliases(tracker, controller)
        stop.wait(look_seconds)


def _holder(lease: RedisLease) -> str:
    try:
        return lease.holder() or "nobody"
    except Exception:  # redis errors of any kind: only for the log line
        return "unknown"


def _sync_aliases(tracker: Tracker, controller: LoopController) -> None:
    registry = controller.registry
    with contextlib.suppress(TrackingError, RegistryError):
        table, _ = registry.routing()
        for name, route in table.models.items():
            tracker.sync_aliases(registry.root, name, route.production, route.canary)
