"""`recsys experiments`: the ops write path and tools for the experiments document.

Every write reads the stored document, applies the change and the re-salting rule
(changes.py), validates the result (config.py), prints a diff and writes it with the version it
read as the expected version; a concurrent edit makes it fail with a conflict, never lose one.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from recsys.artifacts import ArtifactRoot, versions
from recsys.cli.common import CliError, control_plane_arguments, redis_auth
from recsys.cli.exposures import log_directory
from recsys.control.backends import open_store
from recsys.control.store import (
    EXPERIMENTS,
    CorruptDocument,
    Document,
    DocumentStore,
    StoreError,
    VersionConflict,
)
from recsys.experiments import changes
from recsys.experiments.assignment import RequestAttributes, compile_config
from recsys.experiments.config import ConfigError, ExperimentConfig, parse_config
from recsys.experiments.srm import MISMATCH_P_VALUE, ExposureCounts, count_records, srm_test
from recsys.serving.exposure import ExposureReadStats, iter_exposure_lines
from recsys.types import DEFAULT_SURFACE

DOC = EXPERIMENTS


def add_parser(subparsers: Any) -> None:
    common = control_plane_arguments()
    writes = argparse.ArgumentParser(add_help=False)
    writes.add_argument("--dry-run", action="store_true", help="validate and diff, write nothing")
    writes.add_argument(
        "--author",
        default=os.environ.get("USER") or "ops",
        help="who makes the change, for the history (default: $USER or ops)",
    )

    parser = subparsers.add_parser(
        "experiments", help="list, change and check A/B experiments", description=__doc__
    )
    sub = parser.add_subparsers(dest="experiments_command", required=True, metavar="ACTION")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str, *parents: Any) -> Any:
        p = sub.add_parser(name, help=help_, description=help_, parents=[common, *parents])
        p.set_defaults(func=func)
        return p

    add("list", cmd_list, "layers and experiments with status, traffic and arms")
    p = add("show", cmd_show, "the document (or one experiment) as JSON")
    p.add_argument("experiment", nargs="?")
    p = add("validate", cmd_validate, "check a document file without writing it")
    p.add_argument("file", help="JSON document, or - for stdin")
    p = add("export", cmd_export, "the document as JSON with its version, to edit and apply")
    p.add_argument("file", nargs="?", default="-", help="where to write it (default: stdout)")
    p = add("apply", cmd_apply, "replace the document with FILE (prints a diff)", writes)
    p.add_argument("file", help="JSON document, or - for stdin")
    p.add_argument(
        "--force",
        action="store_true",
        help=f"write even if the store moved on from the file's {changes.VERSION_KEY}",
    )
    p.add_argument(
        "--force-over-corrupt",
        action="store_true",
        help="replace a stored document that does not parse",
    )
    p = add("ramp", cmd_ramp, "set an experiment's share of its layer's traffic", writes)
    p.add_argument("experiment")
    p.add_argument("percent", type=float, help="0..100 (0 stops the experiment)")
    p = add("stop", cmd_stop, "stop an experiment (its users get the launch defaults)", writes)
    p.add_argument("experiment")
    p = add(
        "kill",
        cmd_kill,
        "kill an experiment, or with --all switch every experiment off (defaults for all)",
        writes,
    )
    p.add_argument("experiment", nargs="?")
    p.add_argument("--all", action="store_true", help="the global kill switch")
    p.add_argument("--release", action="store_true", help="with --all: turn the switch off")
    p = add("history", cmd_history, "who changed what, newest first")
    p.add_argument("--limit", type=int, default=20)
    p = add("srm", cmd_srm, "sample-ratio-mismatch test of an experiment's exposure counts")
    p.add_argument("experiment")
    p.add_argument("--counts", type=Path, help='JSON {"arm": count} instead of the exposure log')
    p.add_argument(
        "--exposures",
        type=Path,
        help="exposure log dir (default: $RECSYS_EXPOSURE_DIR, else exposures/ beside the "
        "artifact root, where recsys serve writes); plain and rotated .jsonl.gz files",
    )
    p.add_argument("--requests", action="store_true", help="count requests, not distinct users")
    p.add_argument("--since-version", type=int, help="only records served by this version or later")
    p = add("assign", cmd_assign, "the bucket, experiment and arm of user ids in every layer")
    p.add_argument("source", nargs="?", default="-", help="file of user ids, one a line (- stdin)")
    p.add_argument("--json", action="store_true", help="one JSON object per user id")
    p.add_argument("--surface", default=DEFAULT_SURFACE)
    p.add_argument("--platform", default="")
    p.add_argument("--has-location", action="store_true")


# -- plumbing ----------------------------------------------------------------------------------


def _store(args: argparse.Namespace) -> DocumentStore:
    try:
        return open_store(
            args.control, args.artifacts, prefix=args.control_prefix, auth=redis_auth(args)
        )
    except StoreError as e:
        raise CliError(str(e)) from e


def _read(store: DocumentStore) -> Document | None:
    try:
        return store.read(DOC)
    except CorruptDocument as e:
        raise CliError(_corrupt_message(e)) from e
    except StoreError as e:
        raise CliError(str(e)) from e


def _corrupt_message(e: CorruptDocument) -> str:
    return (
        f"{DOC}: the stored version {e.version} is corrupt and cannot be read "
        f"({e.detail}); servers keep serving their last good version. Replace it "
        f"with `recsys experiments apply FILE --force-over-corrupt` or "
        f"`recsys control restore {DOC} VERSION` (see `recsys experiments history`)"
    )


def _stored_document(args: argparse.Namespace) -> Document:
    """The stored experiments document (a CliError when there is none)."""
    store = _store(args)
    try:
        return _require(store)
    finally:
        store.close()


def _require(store: DocumentStore) -> Document:
    document = _read(store)
    if document is None:
        raise CliError(
            f"no {DOC} document in {store.url}; run `recsys build` or "
            f"`recsys experiments apply FILE` first"
        )
    return document


def known_model_versions(artifacts: Path) -> set[str] | None:
    """Published model versions in the artifact root, or None if it has no models directory."""
    models = artifacts / "models"
    if not models.is_dir():
        return None
    root = ArtifactRoot(artifacts)
    return {v for d in models.iterdir() if d.is_dir() for v in versions(root.models(d.name))}


def _validate(doc: Any, artifacts: Path, source: str) -> ExperimentConfig:
    try:
        return parse_config(doc, known_model_versions=known_model_versions(artifacts))
    except ConfigError as e:
        raise CliError(f"{source}: invalid experiments document: {e}") from e


def _load_json(source: str, stdin: TextIO) -> Any:
    try:
        text = stdin.read() if source == "-" else Path(source).read_text()
    except OSError as e:
        raise CliError(f"{source}: cannot read ({e.strerror})") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CliError(f"{source}: not valid JSON ({e})") from e


def _pretty(doc: Any) -> list[str]:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").splitlines(keepends=True)


def _write(
    args: argparse.Namespace,
    change: Callable[[dict[str, Any] | None], dict[str, Any]],
    *,
    base_version: int | None = None,
    over_corrupt: bool = False,
) -> int:
    """Read, change, re-salt, validate, diff and (unless --dry-run) write with the read version.

    ``base_version``: the version the change was made against (an exported file's
    ``_version``); if the store has moved on, a VersionConflict. ``over_corrupt``: a stored
    document that does not parse is replaced (its version counter is the expected version).
    """
    store = _store(args)
    try:
        corrupt_version: int | None = None
        try:
            current = store.read(DOC)
        except CorruptDocument as e:
            if not over_corrupt:
                raise CliError(_corrupt_message(e)) from e
            current, corrupt_version = None, e.version
            print(f"note: replacing the corrupt stored version {e.version}")
        except StoreError as e:
            raise CliError(str(e)) from e
        stored_version = (
            corrupt_version if corrupt_version is not None else (current.version if current else 0)
        )
        if base_version is not None and base_version != stored_version:
            raise CliError(
                str(VersionConflict(DOC, base_version, current))
                + " (or apply with --force to overwrite it)"
            )
        previous = current.body if current else None
        try:
            prepared = changes.prepare_write(previous, change(previous))
        except ConfigError as e:
            raise CliError(f"invalid change: {e}") from e
        _validate(prepared.doc, args.artifacts, "the new document")
        diff = list(
            difflib.unified_diff(
                _pretty(previous) if previous is not None else [],
                _pretty(prepared.doc),
                fromfile=f"{DOC} v{stored_version}"
                + (" (corrupt)" if corrupt_version is not None else ""),
                tofile=f"{DOC} (new)",
            )
        )
        sys.stdout.writelines(diff)
        for note in prepared.notes:
            print(f"note: {note}")
        if not diff:
            print("no changes")
            return 0
        if args.dry_run:
            print("dry run: nothing written")
            return 0
        expected = stored_version
        try:
            written = store.write(DOC, prepared.doc, expected_version=expected, author=args.author)
        except StoreError as e:
            raise CliError(str(e)) from e
        print(f"{DOC}: version {expected} -> {written.version} written by {written.author}")
        return 0
    finally:
        store.close()


def _edit(
    fn: Callable[[dict[str, Any]], dict[str, Any]],
) -> Callable[[dict[str, Any] | None], dict[str, Any]]:
    """A change that needs an existing document, with edit errors turned into CLI errors."""

    def change(previous: dict[str, Any] | None) -> dict[str, Any]:
        if previous is None:
            raise CliError(f"no {DOC} document yet; `recsys experiments apply FILE` creates one")
        try:
            return fn(previous)
        except KeyError as e:
            raise CliError(str(e.args[0])) from e
        except ValueError as e:
            raise CliError(str(e)) from e

    return change


# -- subcommands -------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    document = _stored_document(args)
    config = _validate(document.body, args.artifacts, f"stored version {document.version}")
    holdout = config.holdout.bucket_count / config.num_buckets
    print(
        f"{DOC} version {document.version} by {document.author}; "
        f"kill switch {'ON' if config.kill_switch else 'off'}; global holdout {holdout:.1%}"
    )
    rows = [("LAYER", "EXPERIMENT", "STATUS", "TRAFFIC", "EPOCH", "ARMS")]
    for layer in config.layers:
        for exp in layer.experiments:
            share = exp.bucket_count / layer.num_buckets if exp.running else 0.0
            arms = " ".join(f"{a.name}:{a.weight:g}" for a in exp.arms)
            rows.append((layer.name, exp.name, exp.status, f"{share:.1%}", str(exp.epoch), arms))
        if not layer.experiments:
            rows.append((layer.name, "-", "", "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    document = _stored_document(args)
    if args.experiment:
        try:
            layer, exp = changes.find_experiment(document.body, args.experiment)
        except KeyError as e:
            raise CliError(str(e.args[0])) from e
        print(json.dumps({"layer": layer.get("name"), **exp}, indent=2, sort_keys=True))
        return 0
    print(f"# {DOC} version {document.version} by {document.author}", file=sys.stderr)
    print(json.dumps(document.body, indent=2, sort_keys=True))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    document = _stored_document(args)
    text = json.dumps({**document.body, changes.VERSION_KEY: document.version}, indent=2)
    if args.file == "-":
        print(text)
    else:
        try:
            Path(args.file).write_text(text + "\n")
        except OSError as e:
            raise CliError(f"{args.file}: cannot write ({e.strerror})") from e
        print(f"{DOC} version {document.version} written to {args.file}", file=sys.stderr)
    return 0


def _load_document(source: str) -> tuple[dict[str, Any], int | None]:
    """A document file without its ``_version``, and that version (None if it has none)."""
    doc = _load_json(source, sys.stdin)
    if not isinstance(doc, dict):
        raise CliError(f"{source}: expected a JSON object, got {type(doc).__name__}")
    try:
        return changes.split_version(doc)
    except ConfigError as e:
        raise CliError(f"{source}: {e}") from e


def cmd_validate(args: argparse.Namespace) -> int:
    config = _validate(_load_document(args.file)[0], args.artifacts, args.file)
    exps = [e for layer in config.layers for e in layer.experiments]
    running = sum(e.running for e in exps)
    print(
        f"{args.file}: valid ({len(config.layers)} layers, {len(exps)} experiments, "
        f"{running} running)"
    )
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    doc, version = _load_document(args.file)
    return _write(
        args,
        lambda _previous: doc,
        base_version=None if args.force else version,
        over_corrupt=args.force_over_corrupt,
    )


def cmd_ramp(args: argparse.Namespace) -> int:
    return _write(args, _edit(lambda doc: changes.ramp(doc, args.experiment, args.percent)))


def cmd_stop(args: argparse.Namespace) -> int:
    return _write(args, _edit(lambda doc: changes.set_status(doc, args.experiment, "stopped")))


def cmd_kill(args: argparse.Namespace) -> int:
    if args.all == bool(args.experiment):
        raise CliError("kill: give either an experiment name or --all")
    if args.release and not args.all:
        raise CliError("kill: --release only goes with --all")
    if args.all:
        return _write(args, _edit(lambda doc: changes.set_kill_switch(doc, not args.release)))
    return _write(args, _edit(lambda doc: changes.set_status(doc, args.experiment, "killed")))


def cmd_history(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        entries = store.history(DOC, limit=args.limit)
    except StoreError as e:
        raise CliError(str(e)) from e
    finally:
        store.close()
    for entry in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.updated_at))
        print(f"v{entry.version}  {when}  {entry.author}")
        for change in entry.changes:
            print(f"    {change}")
    if not entries:
        print(f"no history for {DOC}")
    return 0


def cmd_srm(args: argparse.Namespace) -> int:
    document = _stored_document(args)
    config = _validate(document.body, args.artifacts, f"stored version {document.version}")
    found = config.find(args.experiment)
    if found is None:
        raise CliError(f"no experiment named {args.experiment!r} in {DOC} v{document.version}")
    weights = {arm.name: arm.weight for arm in found[1].arms}
    if args.counts is not None:
        raw = _load_json(str(args.counts), sys.stdin)
        if not isinstance(raw, dict) or not all(isinstance(v, int) for v in raw.values()):
            raise CliError(f"{args.counts}: expected a JSON object {{arm: count}}")
        counts: dict[str, int] = {str(k): v for k, v in raw.items()}
        source = str(args.counts)
    else:
        log_dir = log_directory(args.exposures, args.artifacts)
        tally, files = _count_logged_exposures(
            log_dir,
            args.experiment,
            unique_users=not args.requests,
            since_version=args.since_version,
        )
        if not files:
            raise CliError(
                f"{log_dir}: no exposure logs (*.jsonl, *.jsonl.gz); pass --counts FILE instead"
            )
        counts = tally.counts
        unit = "requests" if args.requests else "distinct users"
        source = f"{files} files in {log_dir}, {tally.lines} lines ({unit})"
        if tally.skipped:
            source += f", {tally.skipped} unreadable lines skipped"
    try:
        result = srm_test(counts, weights)
    except ValueError as e:
        raise CliError(f"srm {args.experiment}: {e}") from e
    total = sum(result.observed)
    print(f"srm {args.experiment}: {source}")
    print(f"{'ARM':<16} {'WEIGHT':>8} {'OBSERVED':>10} {'EXPECTED':>12} {'SHARE':>7}")
    for arm, observed, expected in zip(result.arms, result.observed, result.expected, strict=True):
        print(
            f"{arm:<16} {weights[arm]:>8g} {observed:>10} {expected:>12.1f} "
            f"{observed / total:>7.2%}"
        )
    verdict = (
        f"MISMATCH (p < {MISMATCH_P_VALUE}): the split is not the configured one; "
        "do not trust this experiment's results"
        if result.mismatch
        else f"ok (no mismatch at p < {MISMATCH_P_VALUE})"
    )
    print(f"chi-square {result.statistic:.3f}, p-value {result.p_value:.6g}: {verdict}")
    return 1 if result.mismatch else 0


def _count_logged_exposures(
    directory: Path, experiment: str, *, unique_users: bool, since_version: int | None
) -> tuple[ExposureCounts, int]:
    """:func:`~recsys.experiments.srm.count_records` over the exposure log
    reader (plain and rotated, compressed files alike); also returns the number of files."""
    read = ExposureReadStats()
    counts, unusable = count_records(
        (record for _path, _number, record in iter_exposure_lines(directory, read)),
        experiment,
        unique_users=unique_users,
        since_version=since_version,
    )
    tally = ExposureCounts(
        counts=counts, lines=read.records + read.skipped, skipped=read.skipped + unusable
    )
    return tally, read.files


def _user_ids(source: str) -> Iterator[str]:
    try:
        stream = contextlib.nullcontext(sys.stdin) if source == "-" else Path(source).open()  # noqa: SIM115
    except OSError as e:
        raise CliError(f"{source}: cannot read ({e.strerror})") from e
    with stream as lines:
        for line in lines:
            user_id = line.strip()
            if user_id:
                yield user_id


def cmd_assign(args: argparse.Namespace) -> int:
    document = _stored_document(args)
    try:
        assigner = compile_config(document.body, version=str(document.version))
    except ConfigError as e:
        raise CliError(f"stored version {document.version}: invalid: {e}") from e
    attributes = RequestAttributes(args.surface, args.platform, args.has_location)
    out = sys.stdout
    for user_id in _user_ids(args.source):
        layers = assigner.assign_all_layers(user_id, attributes)
        if args.json:
            record = {
                "user_id": user_id,
                "layers": [
                    {"layer": a.layer, "bucket": a.bucket, "experiment": a.experiment, "arm": a.arm}
                    for a in layers
                ],
            }
            out.write(json.dumps(record) + "\n")
        else:
            for a in layers:
                out.write(
                    f"{user_id}\t{a.layer}\t{a.bucket}\t{a.experiment or '-'}\t{a.arm or '-'}\n"
                )
    return 0
