"""What every subcommand shares: the error a user can fix, and the control-plane flags."""

from __future__ import annotations

import argparse
import os
from datetime import datetime
from pathlib import Path

from recsys.serving.logs import LOG_FORMATS
from recsys.settings import DEFAULT_ARTIFACTS, RedisAuth, TrackingSettings, env_default


class CliError(Exception):
    """A problem with the user's input or environment, reported as ``recsys: <message>``."""


def checked_log_format(value: str, source: str) -> str:
    """``value`` if it names a log format (text or json), else a :class:`CliError` naming
    ``source`` (the flag or variable it came from)."""
    if value not in LOG_FORMATS:
        raise CliError(f"{source} {value!r}: expected one of {', '.join(LOG_FORMATS)}")
    return value


def add_artifacts_argument(parser: argparse.ArgumentParser) -> None:
    """``--artifacts DIR``, defaulting to $RECSYS_ARTIFACTS or ./artifacts."""
    parser.add_argument(
        "--artifacts",
        type=Path,
        default=Path(env_default("artifacts", str(DEFAULT_ARTIFACTS))),
        help="artifact root (default: $RECSYS_ARTIFACTS or ./artifacts)",
    )


def control_plane_arguments() -> argparse.ArgumentParser:
    """The flags every ops command shares: where the artifacts and the control plane are.

    Use as a parent parser: ``add_parser(..., parents=[control_plane_arguments()])``.
    """
    common = argparse.ArgumentParser(add_help=False)
    add_artifacts_argument(common)
    common.add_argument(
        "--control",
        default=env_default("control", ""),
        help="control plane: '' = file in the artifact root, or redis://HOST:PORT/DB "
        "(default: $RECSYS_CONTROL)",
    )
    common.add_argument(
        "--control-prefix",
        default=env_default("control_prefix", "recsys:"),
        help="key prefix in Redis (default: $RECSYS_CONTROL_PREFIX or recsys:)",
    )
    add_redis_auth_arguments(common)
    return common


def add_redis_auth_arguments(parser: argparse.ArgumentParser) -> None:
    """``--redis-password-file`` and ``--redis-ca-file`` (RECSYS_REDIS_PASSWORD_FILE,
    RECSYS_REDIS_CA_FILE); the user goes in the URL: ``redis://recsys-ops@HOST:PORT/DB``."""
    password_file = env_default("redis_password_file", "")
    ca_file = env_default("redis_ca_file", "")
    parser.add_argument(
        "--redis-password-file",
        type=Path,
        default=Path(password_file) if password_file else None,
        help="file holding the password of the Redis user named in the URL "
        "(redis://USER@HOST:PORT/DB); default: $RECSYS_REDIS_PASSWORD_FILE",
    )
    parser.add_argument(
        "--redis-ca-file",
        type=Path,
        default=Path(ca_file) if ca_file else None,
        help="PEM CA certificates of the Redis server, for rediss:// URLs "
        "(default: $RECSYS_REDIS_CA_FILE)",
    )


def redis_auth(args: argparse.Namespace) -> RedisAuth:
    """The Redis credentials the flags of :func:`add_redis_auth_arguments` name."""
    return RedisAuth(
        password_file=getattr(args, "redis_password_file", None),
        ca_file=getattr(args, "redis_ca_file", None),
    )


def tracking_arguments() -> argparse.ArgumentParser:
    """``--tracking-uri`` and ``--no-tracking``, for the commands that train or route models."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", ""),
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite in "
        "<artifacts>/mlflow)",
    )
    common.add_argument(
        "--no-tracking", action="store_true", help="do not log runs or aliases to MLflow"
    )
    return common


def tracking_settings(args: argparse.Namespace, artifacts: Path) -> TrackingSettings:
    return TrackingSettings(
        artifacts=artifacts, uri=args.tracking_uri, enabled=not args.no_tracking
    )


def parse_time(text: str, flag: str) -> float:
    """Seconds since the epoch from an ISO 8601 time or a number of seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError as e:
        raise CliError(
            f"{flag} {text!r}: expected an ISO time (2026-12-01T12:00) or epoch seconds"
        ) from e
