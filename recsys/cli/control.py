"""`recsys control`: inspect and repair the control-plane documents, whatever their owner.

- ``show DOCUMENT``: version, author, time, and whether the stored document parses.
- ``restore DOCUMENT VERSION``: write an earlier version back, from the store's history (each
  history entry keeps the full body, for the last HISTORY_LIMIT versions), with the current
  version as the expected one (a concurrent write makes it fail, never lost).
- ``reseed --from DIR``: write back every document a store lost (a Redis restarted without
  persistence) from a directory of stored documents: a server's last good copies
  (``<exposure dir>/control-last-good``) or a file store (``<artifacts>/control``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from recsys.cli.common import CliError, control_plane_arguments, redis_auth
from recsys.control.backends import open_store
from recsys.control.last_good import LastGood
from recsys.control.store import (
    DOCUMENTS,
    HISTORY_LIMIT,
    CorruptDocument,
    Document,
    DocumentStore,
    HistoryEntry,
    StoreError,
    check_name,
)


def add_parser(subparsers: Any) -> None:
    common = control_plane_arguments()
    writes = argparse.ArgumentParser(add_help=False)
    writes.add_argument("--dry-run", action="store_true", help="say what would be written")
    writes.add_argument(
        "--author",
        default=os.environ.get("USER") or "ops",
        help="who makes the change, for the history (default: $USER or ops)",
    )
    parser = subparsers.add_parser(
        "control", help="inspect, restore and reseed control documents", description=__doc__
    )
    sub = parser.add_subparsers(dest="control_command", required=True, metavar="ACTION")
    p = sub.add_parser("show", help="version, author, time and whether it parses", parents=[common])
    p.add_argument("document", help=f"one of {', '.join(DOCUMENTS)} (or another name)")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser(
        "restore", help="write an earlier version back from the history", parents=[common, writes]
    )
    p.add_argument("document")
    p.add_argument("version", type=int)
    p.set_defaults(func=cmd_restore)
    p = sub.add_parser(
        "reseed",
        help="write back the documents a store lost, from last good copies or a file store",
        parents=[common, writes],
    )
    p.add_argument(
        "--from",
        dest="source",
        type=Path,
        required=True,
        help="a directory of <document>.json: a server's <exposure dir>/control-last-good, "
        "or a file store such as <artifacts>/control",
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="also replace documents the store has (default: only missing or corrupt ones)",
    )
    p.set_defaults(func=cmd_reseed)


def _store(args: argparse.Namespace) -> DocumentStore:
    try:
        return open_store(
            args.control, args.artifacts, prefix=args.control_prefix, auth=redis_auth(args)
        )
    except StoreError as e:
        raise CliError(str(e)) from e


def _name(name: str) -> str:
    try:
        return check_name(name)
    except StoreError as e:
        raise CliError(str(e)) from e


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _history_entry(store: DocumentStore, name: str, version: int) -> HistoryEntry | None:
    for entry in store.history(name, limit=HISTORY_LIMIT):
        if entry.version == version:
            return entry
    return None


def cmd_show(args: argparse.Namespace) -> int:
    name = _name(args.document)
    store = _store(args)
    try:
        try:
            document = store.read(name)
        except CorruptDocument as e:
            entry = _history_entry(store, name, e.version)
            by = f"{entry.author} at {_when(entry.updated_at)}" if entry else "unknown"
            print(f"{name}: version {e.version}")
            print(f"  written by: {by}")
            print(f"  parses: no ({e.detail})")
            print(
                f"  repair: `recsys control restore {name} VERSION` "
                f"(versions in `recsys control` history) or a forced write"
            )
            return 1
        if document is None:
            print(f"{name}: no document in {store.url}")
            return 1
        print(f"{name}: version {document.version}")
        print(f"  written by: {document.author} at {_when(document.updated_at)}")
        print("  parses: yes")
        return 0
    finally:
        store.close()


def _current_version(store: DocumentStore, name: str) -> tuple[Document | None, int, bool]:
    """The current document (None if missing or corrupt), its version, and whether corrupt."""
    try:
        document = store.read(name)
    except CorruptDocument as e:
        return None, e.version, True
    return document, (document.version if document else 0), False


def cmd_restore(args: argparse.Namespace) -> int:
    name = _name(args.document)
    store = _store(args)
    try:
        entry = _history_entry(store, name, args.version)
        if entry is None:
            raise CliError(
                f"{name}: version {args.version} is not in the history "
                f"(the last {HISTORY_LIMIT} versions are kept)"
            )
        if entry.body is None:
            raise CliError(
                f"{name}: the history entry of version {args.version} has no body (written "
                "before history kept full bodies); restore it with a file instead"
            )
        _, current, corrupt = _current_version(store, name)
        state = " (corrupt)" if corrupt else ""
        if args.dry_run:
            print(f"dry run: would restore {name} v{args.version} over v{current}{state}")
            return 0
        written = store.write(name, entry.body, expected_version=current, author=args.author)
        print(
            f"{name}: version {args.version} (by {entry.author} at {_when(entry.updated_at)}) "
            f"restored over version {current}{state} as version {written.version}"
        )
        return 0
    finally:
        store.close()


def cmd_reseed(args: argparse.Namespace) -> int:
    source = LastGood(args.source)
    if not args.source.is_dir():
        raise CliError(f"{args.source}: not a directory")
    store = _store(args)
    wrote = 0
    try:
        for name in DOCUMENTS:
            copy = source.load(name)
            if copy is None:
                print(f"{name}: no copy in {args.source}, skipped")
                continue
            document, current, corrupt = _current_version(store, name)
            if document is not None and not args.replace:
                print(f"{name}: the store has version {current}, kept (--replace to overwrite)")
                continue
            state = "corrupt" if corrupt else ("missing" if document is None else "present")
            if args.dry_run:
                print(f"dry run: {name}: would write copy v{copy.version} over {state} v{current}")
                continue
            written = store.write(
                name, copy.body, expected_version=current, author=f"{args.author}:reseed"
            )
            wrote += 1
            print(
                f"{name}: copy v{copy.version} (by {copy.author} at {_when(copy.updated_at)}) "
                f"written over {state} v{current} as version {written.version}"
            )
    finally:
        store.close()
    if not args.dry_run:
        print(f"reseeded {wrote} document(s) into {store.url}")
    return 0
