"""``recsys exposures``: the exposure log, what each customer saw (docs/exposures.md).

Subcommands:

- ``show REQUEST_ID``: one request's record (items, arms, versions, snapshot);
- ``user USER [--since T] [--until T]``: what one user was shown, request by request;
- ``archive``: move a Redis Stream of exposure records (``recsys serve --exposure-sink
  redis://...``) into rotating, compressed files with a consumer group, acknowledging each
  entry once it is on disk.

A subcommand is a function ``add_<name>(actions)`` that adds its parser to the ``exposures``
command's sub-parsers and sets ``func``; list it in :data:`SUBCOMMANDS`. Commands that read a
log directory take :func:`log_directory_arguments` as a parent and find the directory with
:func:`log_directory` (the one ``recsys serve`` writes to by default).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from recsys.cli.common import (
    CliError,
    add_artifacts_argument,
    add_redis_auth_arguments,
    redis_auth,
)
from recsys.control.redis_auth import redis_client
from recsys.ids import ID_EXPECTED, is_id
from recsys.settings import ServeSettings, default_exposure_dir, env_default

if TYPE_CHECKING:
    from recsys.serving.exposure import ArchiveStats, StreamArchiver

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def log_directory(exposures: Path | None, artifacts: Path) -> Path:
    """``--exposures DIR``, else ``$RECSYS_EXPOSURE_DIR``, else ``exposures/`` beside the
    artifact root: where ``recsys serve`` writes by default."""
    if exposures is not None:
        return exposures
    env = env_default("exposure_dir", "")
    return Path(env) if env else default_exposure_dir(artifacts)


def log_directory_arguments() -> argparse.ArgumentParser:
    """``--artifacts`` and ``--exposures``, for subcommands that read a log directory."""
    common = argparse.ArgumentParser(add_help=False)
    add_artifacts_argument(common)
    common.add_argument(
        "--exposures",
        type=Path,
        help="exposure log directory (default: $RECSYS_EXPOSURE_DIR, else exposures/ beside "
        "the artifact root)",
    )
    return common


def add_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "exposures",
        help="the exposure log, what each customer saw: show, user, archive",
        description="The exposure log, what each customer saw (docs/exposures.md). archive: "
        "move a Redis Stream of exposure records (recsys serve --exposure-sink redis://...) into "
        "rotating, compressed files with a consumer group, acknowledging each entry once it is "
        "on disk.",
    )
    actions = parser.add_subparsers(dest="exposures_command", required=True, metavar="ACTION")
    for add in SUBCOMMANDS:
        add(actions)


# -- archive ---------------------------------------------------------------------------------


def add_archive(actions: argparse._SubParsersAction[Any]) -> None:
    defaults = ServeSettings()
    p = actions.add_parser(
        "archive",
        help="move a Redis Stream of exposure records into rotating files (consumer group)",
        description="Read the stream with a consumer group, write the records to rotating "
        "files in --out (fsynced), then acknowledge them. Runs until SIGTERM/SIGINT, or with "
        "--once until nothing is waiting. Several archivers may share a group: each gets its "
        "own entries (give each its own --consumer and --out, or the same --out).",
    )
    p.add_argument(
        "--from",
        dest="source",
        default=env_default("exposure_sink", ""),
        help="Redis URL, redis://HOST:PORT/DB (default: $RECSYS_EXPOSURE_SINK)",
    )
    add_redis_auth_arguments(p)
    p.add_argument(
        "--stream",
        default=env_default("exposure_stream", defaults.exposure_stream),
        help="stream key (default: $RECSYS_EXPOSURE_STREAM or %(default)s)",
    )
    p.add_argument("--group", default="archive", help="consumer group (default %(default)s)")
    p.add_argument(
        "--consumer",
        default=socket.gethostname(),
        help="this archiver's name in the group; keep it across restarts so entries it read and "
        "did not acknowledge are archived by the next run (default: the host name)",
    )
    p.add_argument("--out", type=Path, required=True, help="directory of the archive files")
    p.add_argument(
        "--prefix",
        default="exposures",
        help="file name prefix, an id like every name that becomes a path (default %(default)s)",
    )
    p.add_argument(
        "--once", action="store_true", help="archive what is waiting now, then exit (no blocking)"
    )
    p.add_argument(
        "--block-ms",
        type=int,
        default=5000,
        help="longest wait for new entries per read; also bounds how long a stop takes "
        "(default %(default)s)",
    )
    p.add_argument("--count", type=int, default=1000, help="entries per read and file write")
    p.add_argument(
        "--claim-idle-ms",
        type=int,
        default=300_000,
        help="take over entries another consumer of the group read and left unacknowledged "
        "this long (a dead archiver's; default %(default)s)",
    )
    p.add_argument(
        "--max-bytes",
        type=int,
        default=int(
            env_default(
                "exposure_max_bytes",
                str(defaults.exposure_max_bytes),
                flag="`recsys exposures archive --max-bytes`",
            )
        ),
        help="rotate a file at this size (default %(default)s)",
    )
    p.add_argument(
        "--max-age-seconds",
        type=float,
        default=float(
            env_default(
                "exposure_max_age_seconds",
                str(defaults.exposure_max_age_seconds),
                flag="`recsys exposures archive --max-age-seconds`",
            )
        ),
        help="rotate a file open this long (default %(default)s)",
    )
    p.set_defaults(func=cmd_archive)


def cmd_archive(args: argparse.Namespace) -> int:
    import redis

    from recsys.serving.exposure import RotatingFileWriter, StreamArchiver

    if not args.source.startswith(REDIS_SCHEMES):
        raise CliError(f"--from {args.source!r}: expected redis://HOST:PORT/DB")
    for flag, value in (
        ("--block-ms", args.block_ms),
        ("--count", args.count),
        ("--max-bytes", args.max_bytes),
    ):
        if value < 1:
            raise CliError(f"{flag} is {value}; expected >= 1")
    if args.claim_idle_ms < 0:
        raise CliError(f"--claim-idle-ms is {args.claim_idle_ms}; expected >= 0")
    if not args.max_age_seconds > 0:
        raise CliError(f"--max-age-seconds is {args.max_age_seconds}; expected > 0")
    if not args.stream or not args.group or not args.consumer:
        raise CliError("--stream, --group and --consumer must not be empty")
    if not is_id(args.prefix):
        raise CliError(f"--prefix {args.prefix!r}: expected {ID_EXPECTED}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        writer = RotatingFileWriter(
            args.out,
            args.prefix,
            max_bytes=args.max_bytes,
            max_age_seconds=args.max_age_seconds,
            fsync=True,
        )
    except (OSError, ValueError) as e:
        raise CliError(f"--out {args.out}: {e}") from e
    client = redis_client(
        args.source,
        redis_auth(args),
        socket_connect_timeout=5.0,
        socket_timeout=args.block_ms / 1000 + 10.0,
    )
    archiver = StreamArchiver(
        client,
        args.stream,
        args.group,
        args.consumer,
        writer,
        count=args.count,
        claim_idle_ms=args.claim_idle_ms,
    )
    where = f"{args.stream} (group {args.group}, consumer {args.consumer}) to {args.out}"
    try:
        try:
            if archiver.create_group():
                print(f"archive: created group {args.group} on {args.stream}", file=sys.stderr)
            if args.once:
                stats = archiver.drain()
            else:
                stats = _run_until_signalled(archiver, writer.rotate_if_due, args.block_ms)
        except redis.RedisError as e:
            raise CliError(f"archive from {args.source}: {e}") from e
        except OSError as e:
            raise CliError(f"archive to {args.out}: {e}") from e
    finally:
        try:
            writer.close()
        finally:
            client.close()
    summary = f"archived {stats.archived} records from {where}"
    if stats.skipped:
        summary += f"; {stats.skipped} entries without a line skipped"
    if stats.trimmed_unread:
        summary += f"; {stats.trimmed_unread} entries LOST (trimmed before they were read)"
    print(summary)
    return 0


def _run_until_signalled(
    archiver: StreamArchiver, rotate_if_due: Callable[[], None], block_ms: int
) -> ArchiveStats:
    stop = threading.Event()

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return archiver.run(stop, block_ms=block_ms, rotate_if_due=rotate_if_due)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- show and user: what a customer saw --------------------------------------------------------


def add_show(actions: argparse._SubParsersAction[Any]) -> None:
    p = actions.add_parser(
        "show",
        parents=[log_directory_arguments()],
        help="one request's record: items, arms, versions, snapshot",
        description="Print the exposure record of one request: the served items with rank, "
        "score and restaurant, the experiment arms and buckets, the versions and the snapshot.",
    )
    p.add_argument("request_id")
    p.add_argument("--json", action="store_true", help="print the whole record as JSON")
    p.set_defaults(func=cmd_show)


def add_user(actions: argparse._SubParsersAction[Any]) -> None:
    p = actions.add_parser(
        "user",
        parents=[log_directory_arguments()],
        help="what one user was shown, request by request",
        description="List every logged response to USER in the window, oldest first.",
    )
    p.add_argument("user_id")
    p.add_argument("--since", default="", help="from T on (ISO time or epoch seconds)")
    p.add_argument("--until", default="", help="before T (ISO time or epoch seconds)")
    p.add_argument("--json", action="store_true", help="print the whole records, one a line")
    p.set_defaults(func=cmd_user)


def _when(ts: Any) -> str:
    return datetime.fromtimestamp(float(ts), tz=UTC).isoformat(timespec="milliseconds")


def _arms(record: dict[str, Any]) -> str:
    arms = [
        f"{e['layer']}/{e['experiment']}={e['arm']}#{e['bucket']}"
        + (" (forced)" if e["forced"] else "")
        for e in record.get("exposures", [])
    ]
    return ", ".join(arms) or "(no running experiment)"


def cmd_show(args: argparse.Namespace) -> int:
    from recsys.replay import find_record

    record = find_record(log_directory(args.exposures, args.artifacts), args.request_id)
    if args.json:
        print(json.dumps(record, sort_keys=True))
        return 0
    location = record.get("location")
    print(f"request   {record['request_id']}  at {_when(record['ts'])}")
    print(
        f"user      {record['user_id']}  surface {record['surface']}  platform "
        f"{record['platform'] or '-'}  location {location or '(none: home or city centre)'}  "
        f"hour {record.get('hour')}"
    )
    print(
        f"served by snapshot {record.get('snapshot_id') or '?'}  model {record['model_version']}"
        f"  index {record['index_version']}  experiments v{record['config_version']}"
    )
    print(f"arms      {_arms(record)}")
    if record.get("degraded"):
        print(f"degraded  {record.get('degraded_reason')}")
    print(f"{'rank':>4}  {'sku':>9}  {'restaurant':>10}  score")
    for rank, (sku, restaurant, score) in enumerate(
        zip(record["sku_ids"], record.get("restaurant_ids", []), record["scores"], strict=False),
        start=1,
    ):
        print(f"{rank:>4}  {sku:>9}  {restaurant:>10}  {score:.6f}")
    candidates = record.get("candidates")
    if candidates:
        print(f"(record keeps all {len(candidates['sku_ids'])} ranked candidates: --json)")
    return 0


def cmd_user(args: argparse.Namespace) -> int:
    from recsys.cli.common import parse_time
    from recsys.serving.exposure import iter_exposure_lines

    since = parse_time(args.since, "--since") if args.since else float("-inf")
    until = parse_time(args.until, "--until") if args.until else float("inf")
    directory = log_directory(args.exposures, args.artifacts)
    if not directory.is_dir():
        raise CliError(f"--exposures {directory}: no such directory")
    found = 0
    for _path, _number, record in iter_exposure_lines(directory):
        if record.get("user_id") != args.user_id:
            continue
        try:
            ts = float(record["ts"])
        except (KeyError, TypeError, ValueError):
            continue
        if not since <= ts < until:
            continue
        found += 1
        if args.json:
            print(json.dumps(record, sort_keys=True))
            continue
        top = " ".join(str(s) for s in record.get("sku_ids", [])[:5])
        print(
            f"{_when(ts)}  {record['request_id']}  {record.get('surface', '?'):<8} "
            f"snapshot {record.get('snapshot_id') or '?'}  model {record.get('model_version')}  "
            f"{_arms(record)}  top: {top}{' (degraded)' if record.get('degraded') else ''}"
        )
    if not found:
        raise CliError(f"{directory}: no exposure record of user {args.user_id} in that window")
    return 0


SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction[Any]], None], ...] = (
    add_archive,
    add_show,
    add_user,
)
"""Each adds one ``recsys exposures`` subcommand."""
