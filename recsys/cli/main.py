"""The `recsys` console script: one entry point, a subcommand per capability.

Each command module registers its subcommand (``add_parser(subparsers)``) and sets ``func`` on
its parser; ``func(args)`` returns the exit code. This is the composition root: the command
modules wire the packages below together, and :func:`main` is the one place where the errors
a user can fix (bad input, an unreachable control plane, a missing artifact, a refused model)
become one clear line on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from recsys.artifacts import ArtifactError
from recsys.cli import (
    availability,
    build,
    control,
    controller,
    experiments,
    exposures,
    front,
    loop,
    models,
    monitor,
    replay,
    serve,
    simulate,
)
from recsys.cli.common import CliError
from recsys.control.store import StoreError
from recsys.promotion.policy import PolicyError
from recsys.ranking.registry import RegistryError
from recsys.replay import ReplayError
from recsys.settings import SettingError

COMMANDS = (
    build, serve, experiments, models, availability, replay, exposures, control, simulate, monitor,
    loop, controller, front,
)  # fmt: skip

USER_ERRORS: tuple[type[Exception], ...] = (
    CliError,
    StoreError,
    ArtifactError,
    RegistryError,
    ReplayError,
    PolicyError,
    SettingError,
)
"""Domain errors whose message is written for the person at the terminal."""


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys", description="Recommendation serving for the food-delivery home feed."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = make_parser()  # flag defaults read RECSYS_* variables
    except SettingError as e:
        print(f"recsys: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except USER_ERRORS as e:
        print(f"recsys: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
