"""What every subcommand shares: the error a user can fix, and the control-plane flags."""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path

from recsys.settings import DEFAULT_ARTIFACTS, env_default


class CliError(Exception):
    """A problem with the user's input or environment, reported as ``recsys: <message>``."""


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
    return common


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
