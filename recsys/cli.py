"""The `recsys` console script: one entry point, a subcommand per capability.

Each capability registers its own subcommand (``add_parser(subparsers)``) and sets ``func`` on
its parser; ``func(args)`` returns the exit code. Errors a user can fix are raised as
:class:`CliError` and printed as one clear line, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SUBCOMMAND_MODULES = (
    "recsys.build",
    "serving.cli",
    "experiments.cli",
    "ranking.cli",
    "retrieval.cli",
)


class CliError(Exception):
    """A problem with the user's input or environment, reported as ``recsys: <message>``."""


def control_plane_arguments() -> argparse.ArgumentParser:
    """The flags every ops command shares: where the artifacts and the control plane are.

    Use as a parent parser: ``add_parser(..., parents=[control_plane_arguments()])``.
    """
    from pathlib import Path

    from recsys.settings import DEFAULT_ARTIFACTS, env_default

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--artifacts",
        type=Path,
        default=Path(env_default("artifacts", str(DEFAULT_ARTIFACTS))),
        help="artifact root (default: $RECSYS_ARTIFACTS or ./artifacts)",
    )
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


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys", description="Recommendation serving for the food-delivery home feed."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except CliError as e:
        print(f"recsys: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
