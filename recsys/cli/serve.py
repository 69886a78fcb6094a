"""``recsys serve`` (run the gRPC server) and ``recsys recommend`` (call one)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import grpc

from recsys.cli.common import CliError, checked_log_format
from recsys.serving.logs import configure_logging
from recsys.settings import (
    PIN_WORKERS,
    ServeSettings,
    default_exposure_dir,
    env_default,
    is_service_link,
)

log = logging.getLogger(__name__)


def optional_path(raw: str) -> Path | None:
    """A path flag that may be unset: empty means None."""
    return Path(raw) if raw else None


SETTING_TYPES: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "str": str,
    "Path": Path,
    "Path | None": optional_path,
}


EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "Path": "a path",
    "Path | None": "a path",
}


@dataclass(frozen=True)
class BadEnvValue:
    """The default of a flag whose RECSYS_ variable does not convert; reported by
    :func:`serve_settings` when the flag is not given."""

    option: str
    variable: str
    raw: str
    expected: str

    def error(self) -> CliError:
        return CliError(
            f"{self.variable}={self.raw!r} (the default of {self.option}): expected {self.expected}"
        )

    def __str__(self) -> str:
        return f"{self.variable}={self.raw!r}, invalid"


@dataclass(frozen=True)
class IgnoredEnvValue:
    """A port variable holding a Kubernetes service link (``tcp://IP:PORT``, injected for a
    Service named like this setting): not meant for us, so the flag keeps its default and
    :func:`serve_settings` logs one warning."""

    option: str
    variable: str
    raw: str
    default: int

    def __str__(self) -> str:
        return str(self.default)


def add_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    defaults = ServeSettings()
    serve = subparsers.add_parser(
        "serve",
        help="serve Recommend over gRPC (health, reflection, Prometheus metrics)",
        description="Serve the recommender. Flags default to RECSYS_<FLAG> variables.",
    )

    annotations = {f.name: f.type for f in fields(ServeSettings)}

    def flag(field: str, text: str | None = None) -> None:
        """--FIELD, typed like the ServeSettings field, defaulting to RECSYS_FIELD or the field.

        A RECSYS_FIELD that does not convert does not fail here (every subcommand builds this
        parser): the default becomes a :class:`BadEnvValue` that :func:`serve_settings` reports
        as one line, unless the flag itself is given.
        """
        type_name = str(annotations[field])
        kind = SETTING_TYPES[type_name]
        option = f"--{field.replace('_', '-')}"
        default: object = getattr(defaults, field)
        variable = f"RECSYS_{field.upper()}"
        raw = os.environ.get(variable)
        if raw is not None:
            if type_name == "int" and field.endswith("port") and is_service_link(raw):
                default = IgnoredEnvValue(option, variable, raw, getattr(defaults, field))
            else:
                try:
                    default = kind(raw)
                except ValueError:
                    default = BadEnvValue(option, variable, raw, EXPECTED[type_name])
        serve.add_argument(option, type=kind, default=default, help=text)

    flag("artifacts", "artifact root (RECSYS_ARTIFACTS; default %(default)s)")
    flag("host")
    flag("port", "0: any")
    flag("metrics_port", "Prometheus /metrics port (0: any)")
    flag(
        "metrics_host",
        "address of /metrics (default %(default)s: the loopback; 0.0.0.0 for a Prometheus that "
        "scrapes the pod; empty: --host)",
    )
    flag("tls_cert", "PEM certificate chain: the gRPC port speaks TLS only (reloaded on change)")
    flag("tls_key", "PEM private key of --tls-cert")
    flag(
        "tls_client_ca",
        "PEM CA certificates: clients must present a certificate they signed (mutual TLS)",
    )
    flag(
        "redis_password_file",
        "file holding the password of the Redis user named in the URLs "
        "(redis://USER@HOST:PORT/DB), read at each new connection",
    )
    flag("redis_ca_file", "PEM CA certificates of the Redis servers, for rediss:// URLs")
    flag("http_port", "HTTP/JSON endpoint, POST /v1/recommend (-1: off, the default; 0: any)")
    flag(
        "health_port",
        "plaintext gRPC health service only, outside the admission bounds, for kubelet probes "
        "(-1: off, the default; 0: any)",
    )
    flag("control", "control plane: empty for files in the artifact root, or redis://HOST:PORT/DB")
    flag(
        "feature_store",
        "where user vectors are read: empty for the memory-mapped tables, or "
        "redis://HOST:PORT/DB (publish with `recsys features publish`)",
    )
    flag(
        "feature_store_timeout_ms",
        "how long a batch waits for the online feature store before serving the local copy",
    )
    flag("control_prefix", "key prefix in Redis (default %(default)s)")
    flag("batch_max_size")
    flag("batch_max_delay_ms")
    flag(
        "executor_threads",
        "threads running batches per worker (each batch's stages run in one of them)",
    )
    flag("search_threads", "FAISS threads per search in a batch thread (default %(default)s)")
    flag("workers", "server processes sharing the port (SO_REUSEPORT) and one metrics endpoint")
    flag(
        "pin_workers",
        "with --workers N: auto, on or off; worker n runs only on the n-th CPU the server may "
        "use (auto: when it may use exactly N CPUs)",
    )
    flag(
        "worker_port_stride",
        "with --workers N: 0, all share --port; K > 0, worker n listens on --port + n*K alone "
        "(for `recsys front`)",
    )
    flag(
        "cache_entries",
        "result cache size in recommendations per worker (0: off; default %(default)s)",
    )
    flag(
        "max_in_flight",
        "calls served at once per worker; more get RESOURCE_EXHAUSTED (0: no bound)",
    )
    flag(
        "max_concurrent_rpcs",
        "calls gRPC hands to the server at once per worker; more get RESOURCE_EXHAUSTED "
        "before any request is parsed (0: no bound; default %(default)s)",
    )
    flag(
        "max_pending_rpcs",
        "calls gRPC core holds for the event loop per worker; beyond it (up to twice it) gRPC "
        "core ends new calls at once, clients see CANCELLED (0: gRPC's default 1,000; default "
        "%(default)s)",
    )
    flag(
        "max_queue_delay_ms",
        "bound on a request's wait for a batch: new requests are shed at once when the queue "
        "ahead would take longer to drain, and a queued one that waited twice this is shed",
    )
    flag(
        "gc_gen0_threshold",
        "after loading, freeze the loaded heap out of the garbage collector and set its young "
        "threshold to this: how much each young pass walks, and so how long it stalls the "
        "worker (0: leave Python's collector as it is, nothing frozen; default %(default)s)",
    )
    flag(
        "shutdown_grace_seconds",
        "on SIGTERM, health is NOT_SERVING but calls are still served this long, so load "
        "balancers notice, before the drain (default %(default)s)",
    )
    flag("drain_seconds", "after the grace, how long in-flight calls may take to finish")
    flag("monitor_window_seconds", "the drift monitor's sliding window (default %(default)s)")
    flag(
        "monitor_summary_seconds",
        "how often drift windows are appended to monitor/ in the exposure directory (0: never)",
    )
    exposure_dir = env_default("exposure_dir", "")
    serve.add_argument(
        "--exposure-dir",
        type=Path,
        default=Path(exposure_dir) if exposure_dir else None,
        help="the exposure log's own directory, outside the artifact root (RECSYS_EXPOSURE_DIR; "
        "default: exposures/ beside the artifact root); snapshot manifests go to its snapshots/",
    )
    flag("log_format", "text, or json: one object per line for log collectors")
    compiled_cache = env_default("compiled_cache", "")
    serve.add_argument(
        "--compiled-cache",
        type=Path,
        default=Path(compiled_cache) if compiled_cache else None,
        help="where compiled models are cached, a writable directory of this node's own "
        "(RECSYS_COMPILED_CACHE; default: the artifact root's compiled/)",
    )
    flag(
        "exposure_sink",
        "where exposure records go: empty for rotating files in --exposure-dir, or "
        "redis://HOST:PORT/DB for a Redis Stream (move it to files: recsys exposures archive)",
    )
    flag("exposure_stream", "the Redis Stream key of --exposure-sink (default %(default)s)")
    flag("exposure_stream_maxlen", "entries the stream keeps, archived or not (XADD MAXLEN ~)")
    flag("exposure_max_bytes", "rotate an exposure file at this size (default %(default)s)")
    flag("exposure_max_age_seconds", "rotate an exposure file open this long (default %(default)s)")
    flag(
        "exposure_queue_size",
        "exposure records waiting for the writer per worker; more are dropped and counted",
    )
    serve.set_defaults(func=run_serve)

    recommend = subparsers.add_parser(
        "recommend", help="call Recommend on a running server and print the response as JSON"
    )
    recommend.add_argument("--target", default=env_default("target", "127.0.0.1:50051"))
    recommend.add_argument("--user-id", required=True)
    recommend.add_argument("--num-results", type=int, default=0, help="0: the server default")
    recommend.add_argument("--lat", type=float)
    recommend.add_argument("--lon", type=float)
    recommend.add_argument("--surface", default="")
    recommend.add_argument("--platform", default="")
    recommend.add_argument("--timeout", type=float, default=5.0, help="seconds")
    add_client_tls_flags(recommend)
    recommend.set_defaults(func=run_recommend)

    health = subparsers.add_parser(
        "health",
        help="check a server's standard gRPC health service (exit 0 only when SERVING)",
    )
    health.add_argument("--target", default=env_default("target", "127.0.0.1:50051"))
    health.add_argument("--service", default="", help="service name (default: the server)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds")
    add_client_tls_flags(health)
    health.set_defaults(func=run_health)


def add_client_tls_flags(parser: argparse.ArgumentParser) -> None:
    """TLS for ``recommend`` and ``health``, each defaulting to its RECSYS_ variable."""
    parser.add_argument(
        "--tls",
        action="store_true",
        default=bool(env_default("tls", "")),
        help="speak TLS, trusting the system's roots unless --tls-ca is given (RECSYS_TLS)",
    )
    parser.add_argument(
        "--tls-ca",
        type=optional_path,
        default=optional_path(env_default("tls_ca", "")),
        help="PEM CA certificates that signed the server's certificate (implies --tls)",
    )
    parser.add_argument(
        "--tls-client-cert",
        type=optional_path,
        default=optional_path(env_default("tls_client_cert", "")),
        help="PEM client certificate, for a server that requires one (mutual TLS)",
    )
    parser.add_argument(
        "--tls-client-key",
        type=optional_path,
        default=optional_path(env_default("tls_client_key", "")),
        help="PEM private key of --tls-client-cert",
    )
    parser.add_argument(
        "--tls-server-name",
        default=env_default("tls_server_name", ""),
        help="the name the server's certificate must carry, when not the --target host",
    )


def client_credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """The channel credentials the TLS flags ask for; None for plaintext."""
    from recsys.serving.tls import TlsError, channel_credentials

    wanted = args.tls or args.tls_ca or args.tls_client_cert or args.tls_client_key
    if not wanted:
        return None
    try:
        return channel_credentials(args.tls_ca, args.tls_client_cert, args.tls_client_key)
    except TlsError as e:
        raise CliError(str(e)) from None


def serve_settings(args: argparse.Namespace) -> ServeSettings:
    """Check the flags and freeze them into settings; bad values raise :class:`CliError`."""
    for name, value in vars(args).items():
        if isinstance(value, BadEnvValue):
            raise value.error()
        if isinstance(value, IgnoredEnvValue):
            log.warning(
                "recsys: ignoring %s=%r: a Kubernetes service link, not a port (set %s or "
                "enableServiceLinks: false to silence this); %s is %d",
                value.variable,
                value.raw,
                value.option,
                value.option,
                value.default,
            )
            setattr(args, name, value.default)
    checked_log_format(args.log_format, "--log-format")
    if args.workers < 1:
        raise CliError(f"--workers is {args.workers}; expected >= 1")
    if args.pin_workers not in PIN_WORKERS:
        raise CliError(
            f"--pin-workers {args.pin_workers!r}: expected one of {', '.join(PIN_WORKERS)}"
        )
    if args.worker_port_stride < 0:
        raise CliError(
            f"--worker-port-stride is {args.worker_port_stride}; expected >= 0 (0: a shared port)"
        )
    last_port = args.port + (args.workers - 1) * args.worker_port_stride
    if args.port and args.workers > 1 and last_port > 65535:
        raise CliError(
            f"--worker-port-stride {args.worker_port_stride}: worker {args.workers - 1} would "
            f"listen on {last_port}; expected ports <= 65535"
        )
    if args.workers > 1 and args.metrics_port == 0:
        raise CliError("--metrics-port 0 with --workers > 1: give the merged endpoint a port")
    if args.cache_entries < 0:
        raise CliError(f"--cache-entries is {args.cache_entries}; expected >= 0 (0: off)")
    if args.max_in_flight < 0:
        raise CliError(f"--max-in-flight is {args.max_in_flight}; expected >= 0 (0: no bound)")
    if args.max_concurrent_rpcs < 0:
        raise CliError(
            f"--max-concurrent-rpcs is {args.max_concurrent_rpcs}; expected >= 0 (0: no bound)"
        )
    if args.max_pending_rpcs < 0:
        raise CliError(
            f"--max-pending-rpcs is {args.max_pending_rpcs}; expected >= 0 (0: gRPC's default)"
        )
    if args.gc_gen0_threshold < 0:
        raise CliError(f"--gc-gen0-threshold is {args.gc_gen0_threshold}; expected >= 0 (0: off)")
    if args.max_queue_delay_ms <= 0:
        raise CliError(f"--max-queue-delay-ms is {args.max_queue_delay_ms}; expected > 0")
    if not -1 <= args.http_port <= 65535:
        raise CliError(f"--http-port is {args.http_port}; expected -1 (off) or a port in 0..65535")
    if not -1 <= args.health_port <= 65535:
        raise CliError(
            f"--health-port is {args.health_port}; expected -1 (off) or a port in 0..65535"
        )
    for flag, value in (("--port", args.port), ("--metrics-port", args.metrics_port)):
        if not 0 <= value <= 65535:
            raise CliError(f"{flag} is {value}; expected a port in 0..65535 (0 picks a free one)")
    if args.batch_max_size < 1:
        raise CliError(f"--batch-max-size is {args.batch_max_size}; expected >= 1")
    for flag, value in (
        ("--executor-threads", args.executor_threads),
        ("--search-threads", args.search_threads),
    ):
        if value < 1:
            raise CliError(f"{flag} is {value}; expected >= 1")
    if args.batch_max_delay_ms < 0:
        raise CliError(f"--batch-max-delay-ms is {args.batch_max_delay_ms}; expected >= 0")
    if args.feature_store_timeout_ms <= 0:
        raise CliError(
            f"--feature-store-timeout-ms is {args.feature_store_timeout_ms}; expected > 0"
        )
    if args.drain_seconds < 0:
        raise CliError(f"--drain-seconds is {args.drain_seconds}; expected >= 0")
    if args.monitor_window_seconds <= 0:
        raise CliError(f"--monitor-window-seconds is {args.monitor_window_seconds}; expected > 0")
    if args.monitor_summary_seconds < 0:
        raise CliError(
            f"--monitor-summary-seconds is {args.monitor_summary_seconds}; expected >= 0"
        )
    if args.shutdown_grace_seconds < 0:
        raise CliError(f"--shutdown-grace-seconds is {args.shutdown_grace_seconds}; expected >= 0")
    if not args.artifacts.is_dir():
        raise CliError(f"--artifacts {args.artifacts}: no such directory (build one first)")
    check_exposure_flags(args)
    check_security_flags(args)
    return ServeSettings(
        artifacts=args.artifacts,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        http_port=args.http_port,
        health_port=args.health_port,
        control=args.control,
        control_prefix=args.control_prefix,
        feature_store=args.feature_store,
        feature_store_timeout_ms=args.feature_store_timeout_ms,
        workers=args.workers,
        pin_workers=args.pin_workers,
        worker_port_stride=args.worker_port_stride,
        batch_max_size=args.batch_max_size,
        batch_max_delay_ms=args.batch_max_delay_ms,
        executor_threads=args.executor_threads,
        search_threads=args.search_threads,
        drain_seconds=args.drain_seconds,
        shutdown_grace_seconds=args.shutdown_grace_seconds,
        cache_entries=args.cache_entries,
        max_in_flight=args.max_in_flight,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_pending_rpcs=args.max_pending_rpcs,
        max_queue_delay_ms=args.max_queue_delay_ms,
        gc_gen0_threshold=args.gc_gen0_threshold,
        exposure_dir=args.exposure_dir,
        exposure_sink=args.exposure_sink,
        exposure_stream=args.exposure_stream,
        exposure_stream_maxlen=args.exposure_stream_maxlen,
        exposure_max_bytes=args.exposure_max_bytes,
        exposure_max_age_seconds=args.exposure_max_age_seconds,
        exposure_queue_size=args.exposure_queue_size,
        monitor_window_seconds=args.monitor_window_seconds,
        monitor_summary_seconds=args.monitor_summary_seconds,
        metrics_host=args.metrics_host,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        redis_password_file=args.redis_password_file,
        redis_ca_file=args.redis_ca_file,
        compiled_cache=args.compiled_cache,
        log_format=args.log_format,
    )


def check_security_flags(args: argparse.Namespace) -> None:
    """TLS files that load (a key that matches its certificate) and Redis credential files
    that exist; a bad one is a configuration error (exit 2)."""
    from recsys.serving.tls import TlsError, server_credentials

    try:
        server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
    except TlsError as e:
        raise CliError(str(e)) from None
    for option, path in (
        ("--redis-password-file", args.redis_password_file),
        ("--redis-ca-file", args.redis_ca_file),
    ):
        if path is not None and not path.is_file():
            raise CliError(f"{option} {path}: no such file")


def check_redis_credentials(settings: ServeSettings) -> None:
    """Redis refusing the server's credentials is a configuration error (exit 2, one line),
    not an outage to ride out on the last-good copies. An unreachable Redis passes."""
    from recsys.control.redis_auth import RedisAuthError, check_credentials

    urls = {
        "--control": settings.control,
        "--feature-store": settings.feature_store,
        "--exposure-sink": settings.exposure_sink,
    }
    for option, url in urls.items():
        if not url.startswith(("redis://", "rediss://")):
            continue
        try:
            check_credentials(url, settings.redis_auth)
        except (RedisAuthError, ValueError) as e:
            raise CliError(f"{option}: {e}") from None


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def check_exposure_flags(args: argparse.Namespace) -> None:
    """The exposure flags; the directory must be (or be creatable as) a writable directory,
    which the artifact root need not be."""
    if args.exposure_sink and not args.exposure_sink.startswith(REDIS_SCHEMES):
        raise CliError(
            f"--exposure-sink {args.exposure_sink!r}: expected empty (files in --exposure-dir) "
            "or redis://HOST:PORT/DB"
        )
    if not args.exposure_stream:
        raise CliError("--exposure-stream is empty; expected a Redis key")
    if args.exposure_stream_maxlen < 1:
        raise CliError(f"--exposure-stream-maxlen is {args.exposure_stream_maxlen}; expected >= 1")
    if args.exposure_max_bytes < 1:
        raise CliError(f"--exposure-max-bytes is {args.exposure_max_bytes}; expected >= 1")
    if not args.exposure_max_age_seconds > 0:
        raise CliError(
            f"--exposure-max-age-seconds is {args.exposure_max_age_seconds}; expected > 0"
        )
    if args.exposure_queue_size < 1:
        raise CliError(f"--exposure-queue-size is {args.exposure_queue_size}; expected >= 1")
    directory: Path = args.exposure_dir or default_exposure_dir(args.artifacts)
    if directory.exists() and not directory.is_dir():
        raise CliError(f"--exposure-dir {directory}: not a directory")
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CliError(
            f"--exposure-dir {directory}: {existing} is not writable (the exposure log needs a "
            "writable directory of its own, outside the artifact root)"
        )


def run_serve(args: argparse.Namespace) -> int:
    configure_logging("json" if args.log_format == "json" else "text")
    settings = serve_settings(args)
    check_redis_credentials(settings)
    from recsys.artifacts import ArtifactError
    from recsys.serving.server import BindError

    try:
        if settings.workers > 1:
            from recsys.serving.workers import run_workers

            return run_workers(settings)
        from recsys.serving.pipeline import open_pipeline  # FAISS and LightGBM: not for --help
        from recsys.serving.server import run

        run(settings, open_pipeline)
    except ArtifactError as e:
        raise CliError(f"cannot serve {settings.artifacts}: {e}") from e
    except BindError as e:
        raise CliError(f"{e.option} {e.port}: {e.reason}") from e
    return 0


def run_recommend(args: argparse.Namespace) -> int:
    from recsys.serving.client import build_request, recommend, response_to_dict

    try:
        request = build_request(
            args.user_id,
            num_results=args.num_results,
            lat=args.lat,
            lon=args.lon,
            surface=args.surface,
            platform=args.platform,
        )
    except ValueError as e:
        raise CliError(f"--lat/--lon: {e}") from e
    try:
        response = recommend(
            args.target,
            request,
            timeout=args.timeout,
            credentials=client_credentials(args),
            server_name=args.tls_server_name,
        )
    except grpc.RpcError as e:
        code = e.code() if isinstance(e, grpc.Call) else None
        name = code.name if code is not None else "ERROR"
        details = e.details() if isinstance(e, grpc.Call) else str(e)
        raise CliError(f"Recommend on {args.target} failed: {name}: {details}") from e
    print(json.dumps(response_to_dict(response), indent=2))
    return 0


def run_health(args: argparse.Namespace) -> int:
    """Used by the Dockerfile HEALTHCHECK and by people: prints the status, 0 iff SERVING."""
    from recsys.serving.client import health_status

    try:
        status = health_status(
            args.target,
            service=args.service,
            timeout=args.timeout,
            credentials=client_credentials(args),
            server_name=args.tls_server_name,
        )
    except grpc.RpcError as e:
        code = e.code() if isinstance(e, grpc.Call) else None
        print(f"{args.target}: {code.name if code is not None else 'UNREACHABLE'}")
        return 1
    print(f"{args.target}: {status}")
    return 0 if status == "SERVING" else 1
