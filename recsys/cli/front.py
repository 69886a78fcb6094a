"""``recsys front``: the admission front (HAProxy) in front of the servers' gRPC ports.

It renders the configuration of recsys/serving/front.py, checks it with ``haproxy -c``, and runs
HAProxy on it until SIGTERM or SIGINT: then it keeps forwarding for
``--shutdown-grace-seconds`` (as ``recsys serve`` keeps serving), and soft-stops HAProxy so the
calls in flight finish. ``--print-config`` prints the configuration instead.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from recsys.cli.common import CliError, checked_log_format
from recsys.serving.front import (
    FrontError,
    FrontSettings,
    haproxy_config,
    parse_backend,
    serve_front,
)
from recsys.serving.logs import configure_logging
from recsys.serving.routing import USER_HEADER
from recsys.settings import env_default

DEFAULT_MAX_IN_FLIGHT = 32
DEFAULT_MAX_QUEUE_MS = 4
DEFAULT_MAX_QUEUED = 0
DEFAULT_METRICS = "127.0.0.1:9101"


def add_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    front = subparsers.add_parser(
        "front",
        help="run the admission front (HAProxy) in front of the servers' gRPC ports",
        description="Run HAProxy in front of recsys servers: each backend gets at most "
        "--max-in-flight calls at once; a call that waited --max-queue-ms for one is "
        "answered RESOURCE_EXHAUSTED without reaching a server (docs/security.md). Flags "
        "default to RECSYS_FRONT_<FLAG> variables.",
    )
    # Read as text and checked in front_settings: a bad variable fails this command in one
    # line, not every subcommand (the parser of each is built at every start).
    front.add_argument(
        "--listen",
        default=env_default("front_listen", "127.0.0.1:50051"),
        help="HOST:PORT the front listens on, plaintext HTTP/2 (default %(default)s)",
    )
    front.add_argument(
        "--backend",
        action="append",
        help="HOST:PORT of a server's gRPC port; repeat for each worker (`recsys serve "
        "--workers N --worker-port-stride 1`) (default: $RECSYS_FRONT_BACKENDS, "
        "comma-separated)",
    )
    front.add_argument(
        "--max-in-flight",
        default=env_default("front_max_in_flight", str(DEFAULT_MAX_IN_FLIGHT)),
        help="calls given to each backend at once (default %(default)s)",
    )
    front.add_argument(
        "--max-queue-ms",
        default=env_default("front_max_queue_ms", str(DEFAULT_MAX_QUEUE_MS)),
        help="how long a call may wait for a backend before it is refused (default %(default)s)",
    )
    front.add_argument(
        "--max-queued",
        default=env_default("front_max_queued", str(DEFAULT_MAX_QUEUED)),
        help="calls that may wait at once; a call that finds this many waiting is refused at "
        "once (0: no bound but the time; default %(default)s)",
    )
    front.add_argument(
        "--balance",
        default=env_default("front_balance", "user"),
        help="how a call's backend is chosen: user (the worker a hash of the call's "
        f"{USER_HEADER} header names, so a user's refreshes reach the worker caching the feed, "
        "while it has a free slot; else, or without the header, the least loaded) or "
        "leastconn (default %(default)s)",
    )
    front.add_argument(
        "--metrics",
        default=env_default("front_metrics", DEFAULT_METRICS),
        help="HOST:PORT where HAProxy's Prometheus exporter serves /metrics: the calls the "
        "front refused, its queue, each backend's calls in flight (empty: none; default "
        "%(default)s, loopback: bind it wider only where a NetworkPolicy guards the port)",
    )
    front.add_argument(
        "--shutdown-grace-seconds",
        default=env_default("front_shutdown_grace_seconds", "5"),
        help="on SIGTERM, keep forwarding this long before draining (default %(default)s, as "
        "`recsys serve`)",
    )
    front.add_argument(
        "--print-config", action="store_true", help="print the HAProxy configuration and exit"
    )
    front.set_defaults(func=run_front)


def whole_number(flag: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise CliError(f"front {flag} {raw!r}: expected a whole number") from None


def front_settings(args: argparse.Namespace) -> FrontSettings:
    backends = args.backend or [
        b.strip() for b in env_default("front_backends", "").split(",") if b.strip()
    ]
    if not backends:
        raise CliError("front --backend: expected at least one HOST:PORT")
    try:
        listen = parse_backend(args.listen, "--listen")
        metrics = parse_backend(args.metrics, "--metrics") if args.metrics.strip() else None
        return FrontSettings(
            listen.host,
            listen.port,
            tuple(parse_backend(b) for b in backends),
            whole_number("--max-in-flight", args.max_in_flight),
            whole_number("--max-queue-ms", args.max_queue_ms),
            whole_number("--max-queued", args.max_queued),
            metrics,
            args.balance,
        )
    except FrontError as e:
        raise CliError(str(e)) from e


def run_front(args: argparse.Namespace) -> int:
    settings = front_settings(args)
    try:
        grace = float(args.shutdown_grace_seconds)
    except ValueError:
        raise CliError(
            f"front --shutdown-grace-seconds {args.shutdown_grace_seconds!r}: expected a number"
        ) from None
    if grace < 0:
        raise CliError(f"front --shutdown-grace-seconds {grace}: expected >= 0")
    if args.print_config:
        print(haproxy_config(settings), end="")
        return 0
    configure_logging(checked_log_format(env_default("log_format", "text"), "RECSYS_LOG_FORMAT"))
    with tempfile.TemporaryDirectory(prefix="recsys-front-") as config_dir:
        try:
            return serve_front(settings, Path(config_dir), grace)
        except FrontError as e:
            raise CliError(str(e)) from e
