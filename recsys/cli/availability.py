"""`recsys availability`: switch items and restaurants off and on, live.

Writes the control plane's ``availability`` document (see retrieval/availability.py) with the
version it read, so two ops editing at once cannot lose an update; every server compiles the new
snapshot off the hot path and serves it from the next request. The new document is validated
against the catalogue of the world in ``--artifacts`` (the one the routed index was built from)
before anything is written.
"""

from __future__ import annotations

import argparse
import getpass
import json
from pathlib import Path
from typing import Any

import numpy as np

from recsys.artifacts import ArtifactError, ArtifactRoot, versions
from recsys.cli.common import control_plane_arguments, redis_auth
from recsys.control.backends import open_store
from recsys.control.redis_auth import redis_client
from recsys.control.store import AVAILABILITY, ROUTING, Document, DocumentStore, StoreError
from recsys.retrieval.availability import DOCUMENT_FIELDS, Availability
from recsys.settings import env_default
from recsys.world import Catalogue, load_world

DOC = AVAILABILITY


def add_parser(subparsers: Any) -> None:
    common = control_plane_arguments()
    targets = argparse.ArgumentParser(add_help=False)
    targets.add_argument("--sku", type=int, action="append", default=[], help="SKU id (repeatable)")
    targets.add_argument(
        "--restaurant", type=int, action="append", default=[], help="restaurant id (repeatable)"
    )
    targets.add_argument("--author", default=env_default("author", getpass.getuser()))
    targets.add_argument("--dry-run", action="store_true", help="validate and print, write nothing")

    p = subparsers.add_parser(
        DOC,
        help="switch SKUs and restaurants off or on (closed, sold out), live",
        description="Read or change the availability document every server follows.",
    )
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    off = sub.add_parser("off", parents=[common, targets], help="switch SKUs/restaurants off")
    off.set_defaults(func=cmd_off)
    on = sub.add_parser("on", parents=[common, targets], help="switch SKUs/restaurants back on")
    on.set_defaults(func=cmd_on)
    show = sub.add_parser("show", parents=[common], help="print the current document")
    show.set_defaults(func=cmd_show)

    features = subparsers.add_parser(
        "features",
        help="the online feature store (Redis) that a fleet's servers read user vectors from",
    )
    fsub = features.add_subparsers(dest="action", required=True, metavar="ACTION")
    publish = fsub.add_parser(
        "publish",
        parents=[common],
        help="write the user feature rows (vector and ranking inputs) of the served features "
        "version to the online store",
    )
    publish.add_argument(
        "--feature-store",
        required=True,
        help="redis://HOST:PORT/DB; keys go under --control-prefix, as `recsys serve` reads them",
    )
    publish.set_defaults(func=cmd_features_publish)


def _store(args: argparse.Namespace) -> DocumentStore:
    from recsys.cli.common import CliError

    try:
        return open_store(
            args.control, args.artifacts, prefix=args.control_prefix, auth=redis_auth(args)
        )
    except StoreError as e:
        raise CliError(str(e)) from e


def served_catalogue(artifacts: Path, index_version: str | None) -> Catalogue | None:
    """The catalogue of the world behind ``index_version`` (the routed one; None: the newest
    index) in ``artifacts``; None when no index is built there."""
    root = ArtifactRoot(artifacts)
    if not root.indexes.is_dir() or not versions(root.indexes):
        return None
    try:
        version = index_version or root.latest(root.indexes).name
        return load_world(root.lineage(version).world_dir).catalogue
    except (ArtifactError, KeyError, OSError) as e:
        from recsys.cli.common import CliError

        raise CliError(f"--artifacts {artifacts}: cannot read the served catalogue: {e}") from e


def change_document(
    body: dict[str, Any] | None, *, off: bool, skus: list[int], restaurants: list[int]
) -> dict[str, Any]:
    """``body`` with ``skus``/``restaurants`` added to (``off``) or removed from the off lists."""
    current = {name: list((body or {}).get(name, [])) for name in DOCUMENT_FIELDS}
    out: dict[str, Any] = {}
    for name, ids in (("skus_off", skus), ("restaurants_off", restaurants)):
        existing = {int(v) for v in current[name]}
        changed = existing | set(ids) if off else existing - set(ids)
        out[name] = sorted(changed)
    return out


def _change(args: argparse.Namespace, *, off: bool) -> int:
    from recsys.cli.common import CliError

    if not args.sku and not args.restaurant:
        raise CliError("expected at least one --sku or --restaurant")
    store = _store(args)
    try:
        try:
            current = store.read(DOC)
            routing = store.read(ROUTING)
        except StoreError as e:
            raise CliError(str(e)) from e
        body = change_document(
            current.body if current else None, off=off, skus=args.sku, restaurants=args.restaurant
        )
        routed = str(routing.body.get("index", "")) if routing else ""
        catalogue = served_catalogue(args.artifacts, routed or None)
        if catalogue is not None:
            try:
                snapshot = Availability.from_document(catalogue, body)
            except ValueError as e:
                raise CliError(f"invalid change: {e}") from e
            summary = f"{snapshot.n_available:,} of {catalogue.n_items:,} SKUs servable"
        else:
            summary = f"not checked against a catalogue (no built world in {args.artifacts})"
        if current is not None and current.body == body:
            print(f"{DOC}: no changes (version {current.version})")
            return 0
        expected = current.version if current else 0
        if args.dry_run:
            print(json.dumps(body, sort_keys=True))
            print(f"dry run: nothing written; {summary}")
            return 0
        try:
            written = store.write(DOC, body, expected_version=expected, author=args.author)
        except StoreError as e:
            raise CliError(str(e)) from e
        print(
            f"{DOC}: version {expected} -> {written.version} written by {written.author}: "
            f"{len(body['skus_off'])} SKUs and {len(body['restaurants_off'])} restaurants off; "
            f"{summary}"
        )
        return 0
    finally:
        store.close()


def cmd_off(args: argparse.Namespace) -> int:
    return _change(args, off=True)


def cmd_on(args: argparse.Namespace) -> int:
    return _change(args, off=False)


def cmd_show(args: argparse.Namespace) -> int:
    from recsys.cli.common import CliError

    store = _store(args)
    try:
        try:
            current: Document | None = store.read(DOC)
        except StoreError as e:
            raise CliError(str(e)) from e
    finally:
        store.close()
    if current is None:
        raise CliError(f"no {DOC} document in {store.url}; run `recsys build` first")
    print(f"{DOC} version {current.version} by {current.author}")
    print(json.dumps(current.body, sort_keys=True))
    skus, restaurants = (len(current.body.get(name, [])) for name in DOCUMENT_FIELDS)
    print(f"{skus} SKUs and {restaurants} restaurants off")
    return 0


def cmd_features_publish(args: argparse.Namespace) -> int:
    """Publish the vectors the routed index was built with, keyed by their features version."""
    import redis

    from recsys.cli.common import CliError
    from recsys.ranking.feature_store import publish_user_vectors
    from recsys.ranking.features import load_feature_tables, user_feature_rows

    store = _store(args)
    try:
        routing = store.read(ROUTING)
    finally:
        store.close()
    if routing is None or not isinstance(routing.body.get("index"), str):
        raise CliError("control plane has no routing document naming an index; build first")
    root = ArtifactRoot(args.artifacts)
    try:
        lineage = root.lineage(routing.body["index"])
        catalogue = load_world(lineage.world_dir).catalogue
    except (ArtifactError, KeyError, FileNotFoundError) as e:
        raise CliError(f"index {routing.body['index']}: cannot load its features: {e}") from e
    features_version = lineage.features_version
    tables = load_feature_tables(lineage.features_dir, catalogue)
    rows = user_feature_rows(tables, np.arange(tables.n_users))
    try:
        client = redis_client(args.feature_store, redis_auth(args), socket_connect_timeout=5)
        written = publish_user_vectors(
            client, args.control_prefix, features_version, tables.user_ids, rows
        )
    except (redis.RedisError, ValueError) as e:
        raise CliError(f"--feature-store {args.feature_store}: {e}") from e
    print(f"published {written:,} user feature rows of features {features_version}")
    return 0
