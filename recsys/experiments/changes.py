"""Edits ops make to the experiments document, and the re-salting rule every write goes through.

Ramping up only adds buckets and keeps the experiment's salt, so nobody already in an arm moves.
Ramp-down, reweighting (arms or weights changed) and restart (not running -> running) bump the
experiment's ``epoch``, which re-salts the arm hash: the users who stay are re-drawn into arms
independently of where they were, so no arm inherits the carry-over of another.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from recsys.experiments.config import DEFAULT_NUM_BUCKETS, ConfigError


@dataclass(frozen=True)
class Prepared:
    """A document ready to validate and write, and what the re-salting rule did to it."""

    doc: dict[str, Any]
    notes: tuple[str, ...]


def _experiments(doc: Mapping[str, Any]) -> Iterator[tuple[Mapping[str, Any], dict[str, Any]]]:
    layers = doc.get("layers")
    for layer in layers if isinstance(layers, list) else []:
        exps = layer.get("experiments") if isinstance(layer, Mapping) else None
        for exp in exps if isinstance(exps, list) else []:
            if isinstance(exp, dict) and isinstance(exp.get("name"), str):
                yield layer, exp


def find_experiment(doc: Mapping[str, Any], name: str) -> tuple[Mapping[str, Any], dict[str, Any]]:
    """The layer and experiment named ``name`` (mutable, inside ``doc``); KeyError if absent."""
    for layer, exp in _experiments(doc):
        if exp["name"] == name:
            return layer, exp
    known = sorted(exp["name"] for _, exp in _experiments(doc))
    raise KeyError(f"no experiment named {name!r}; known experiments: {known[:30]}")


def bucket_set(ranges: Any) -> set[int]:
    found: set[int] = set()
    for r in ranges if isinstance(ranges, list) else []:
        if isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r):
            found.update(range(r[0], r[1]))
    return found


def to_ranges(buckets: Iterable[int]) -> list[list[int]]:
    """Sorted buckets as the fewest half-open ranges [start, end)."""
    ranges: list[list[int]] = []
    for b in sorted(buckets):
        if ranges and ranges[-1][1] == b:
            ranges[-1][1] = b + 1
        else:
            ranges.append([b, b + 1])
    return ranges


def _arms_signature(exp: Mapping[str, Any]) -> list[tuple[Any, Any]]:
    arms = exp.get("arms")
    return [
        (a.get("name"), a.get("weight"))
        for a in (arms if isinstance(arms, list) else [])
        if isinstance(a, Mapping)
    ]


def _resalt_reason(old: Mapping[str, Any], new: Mapping[str, Any], moved: bool) -> str | None:
    if new.get("status") != "running":
        return None
    if moved:
        return "moved to another layer"
    if old.get("status") != "running":
        return "restarted"
    if old.get("buckets") != new.get("buckets") and bucket_set(old.get("buckets")) - bucket_set(
        new.get("buckets")
    ):
        return "ramped down"
    if _arms_signature(old) != _arms_signature(new):
        return "arms or weights changed"
    return None


def prepare_write(previous: Mapping[str, Any] | None, new: Mapping[str, Any]) -> Prepared:
    """Apply the re-salting rule to ``new`` given the stored ``previous`` document.

    Returns a copy of ``new`` whose experiments carry a higher ``epoch`` where the rule requires
    one and the document does not already bump it. An epoch may never go backwards.
    """
    doc: dict[str, Any] = copy.deepcopy(dict(new))
    if previous is None:
        return Prepared(doc, ())
    before = {exp["name"]: (layer.get("name"), exp) for layer, exp in _experiments(previous)}
    notes: list[str] = []
    errors: list[str] = []
    for li, layer in enumerate(doc.get("layers") or []):
        for ei, exp in enumerate(layer.get("experiments") or [] if isinstance(layer, dict) else []):
            if not isinstance(exp, dict) or exp.get("name") not in before:
                continue
            old_layer, old = before[exp["name"]]
            old_epoch = old.get("epoch", 0)
            new_epoch = exp.get("epoch", 0)
            if not (isinstance(old_epoch, int) and isinstance(new_epoch, int)):
                continue  # validation reports the bad epoch
            if new_epoch < old_epoch:
                errors.append(
                    f"layers[{li}].experiments[{ei}].epoch: expected >= {old_epoch} "
                    f"(the stored epoch; epochs only move forward), got {new_epoch}"
                )
                continue
            reason = _resalt_reason(old, exp, moved=old_layer != layer.get("name"))
            if reason is not None and new_epoch == old_epoch:
                exp["epoch"] = old_epoch + 1
                notes.append(
                    f"{exp['name']}: {reason}; re-salted (epoch {old_epoch} -> {old_epoch + 1})"
                )
    if errors:
        raise ConfigError(errors)
    return Prepared(doc, tuple(notes))


def ramp(doc: Mapping[str, Any], experiment: str, percent: float) -> dict[str, Any]:
    """Set ``experiment`` to ``percent`` of its layer's buckets, keeping the buckets it has.

    Growing takes the lowest-numbered buckets no other running experiment of the layer owns;
    shrinking drops the highest-numbered ones; 0% stops the experiment. Raises ValueError when
    the layer has too few free buckets, KeyError for an unknown experiment.
    """
    if not 0 <= percent <= 100:
        raise ValueError(f"ramp percent: expected 0..100, got {percent}")
    result: dict[str, Any] = copy.deepcopy(dict(doc))
    layer, exp = find_experiment(result, experiment)
    num_buckets = layer.get("num_buckets", result.get("num_buckets", DEFAULT_NUM_BUCKETS))
    target = round(num_buckets * percent / 100)
    if target == 0:
        exp["status"] = "stopped"
        exp["buckets"] = []
        return result
    taken: set[int] = set()
    for other in layer.get("experiments") or []:
        if other is not exp and other.get("status") == "running":
            taken |= bucket_set(other.get("buckets"))
    owned = bucket_set(exp.get("buckets")) - taken
    if target <= len(owned):
        kept = sorted(owned)[:target]
    else:
        free = sorted(set(range(num_buckets)) - taken - owned)
        need = target - len(owned)
        if need > len(free):
            raise ValueError(
                f"layer {layer.get('name')!r} has {len(free)} free buckets "
                f"({len(free) / num_buckets:.1%}); ramping {experiment!r} to {percent}% needs "
                f"{need} more"
            )
        kept = sorted(owned) + free[:need]
    exp["buckets"] = to_ranges(kept)
    exp["status"] = "running"
    return result


def set_status(doc: Mapping[str, Any], experiment: str, status: str) -> dict[str, Any]:
    result: dict[str, Any] = copy.deepcopy(dict(doc))
    _, exp = find_experiment(result, experiment)
    exp["status"] = status
    return result


def set_kill_switch(doc: Mapping[str, Any], on: bool) -> dict[str, Any]:
    result: dict[str, Any] = copy.deepcopy(dict(doc))
    result["kill_switch"] = on
    return result


def traffic_share(doc: Mapping[str, Any], experiment: str) -> float:
    """The fraction of its layer's buckets a (running) experiment owns."""
    layer, exp = find_experiment(doc, experiment)
    num_buckets = layer.get("num_buckets", doc.get("num_buckets", DEFAULT_NUM_BUCKETS))
    return float(len(bucket_set(exp.get("buckets"))) / num_buckets)


VERSION_KEY = "_version"
"""Top-level key `recsys experiments export` adds: the stored version the file was exported
from. Not part of the document: `apply` strips it and writes with it as the expected version."""


def split_version(doc: Mapping[str, Any]) -> tuple[dict[str, Any], int | None]:
    """``doc`` without :data:`VERSION_KEY`, and that key's value (None if absent)."""
    body = {k: v for k, v in doc.items() if k != VERSION_KEY}
    if VERSION_KEY not in doc:
        return body, None
    version = doc[VERSION_KEY]
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ConfigError(f"{VERSION_KEY}: expected the exported version (an integer >= 0)")
    return body, version
