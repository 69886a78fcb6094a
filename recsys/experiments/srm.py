"""Sample-ratio mismatch: do the arms' exposure counts match their configured weights?

Counts come from the exposure log the server writes (JSON lines, one per response, with the
``exposures`` it served) or from a ``{arm: count}`` file. Forced (QA) exposures are not counted.
By default each user counts once per arm (a heavy user is one sample, not a thousand).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scipy import stats

MISMATCH_P_VALUE = 0.001


@dataclass(frozen=True)
class ExposureCounts:
    counts: dict[str, int]
    lines: int
    skipped: int
    """Lines that were not valid exposure records."""


@dataclass(frozen=True)
class SrmResult:
    arms: tuple[str, ...]
    observed: tuple[int, ...]
    expected: tuple[float, ...]
    statistic: float
    p_value: float

    @property
    def mismatch(self) -> bool:
        return self.p_value < MISMATCH_P_VALUE


def count_records(
    records: Iterable[Mapping[str, Any]],
    experiment: str,
    *,
    unique_users: bool = True,
    since_version: int | None = None,
) -> tuple[dict[str, int], int]:
    """Exposures of ``experiment`` per arm in parsed exposure records, and how many records
    could not be used (fields missing or of the wrong type). Forced exposures (QA overrides)
    do not count.

    ``since_version``: only records served by config version >= this (e.g. since the last
    re-salt, when users moved between arms).
    """
    users: dict[str, set[str]] = {}
    requests: dict[str, int] = {}
    unusable = 0
    for record in records:
        try:
            if since_version is not None and int(record["config_version"]) < since_version:
                continue
            for e in record["exposures"]:
                if e["experiment"] != experiment or e.get("forced", False):
                    continue
                arm = str(e["arm"])
                requests[arm] = requests.get(arm, 0) + 1
                users.setdefault(arm, set()).add(str(record["user_id"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            unusable += 1
    counts = {arm: len(u) for arm, u in users.items()} if unique_users else requests
    return counts, unusable


def count_exposures(
    paths: Iterable[Path],
    experiment: str,
    *,
    unique_users: bool = True,
    since_version: int | None = None,
) -> ExposureCounts:
    """:func:`count_records` over the given JSON-lines files (a line that is not JSON is
    skipped and counted)."""
    lines = malformed = 0

    def records() -> Iterator[Mapping[str, Any]]:
        nonlocal lines, malformed
        for path in paths:
            with path.open() as f:
                for line in f:
                    if not line.strip():
                        continue
                    lines += 1
                    try:
                        yield json.loads(line)
                    except ValueError:
                        malformed += 1

    counts, unusable = count_records(
        records(), experiment, unique_users=unique_users, since_version=since_version
    )
    return ExposureCounts(counts=counts, lines=lines, skipped=malformed + unusable)


def srm_test(counts: Mapping[str, int], weights: Mapping[str, float]) -> SrmResult:
    """Chi-square goodness of fit of ``counts`` against ``weights`` (arm -> weight)."""
    unknown = sorted(set(counts) - set(weights))
    if unknown:
        raise ValueError(f"counts for {unknown}: not arms of the experiment ({sorted(weights)})")
    if len(weights) < 2:
        raise ValueError(f"arms {sorted(weights)}: expected at least two arms to compare")
    arms = tuple(weights)
    observed = tuple(int(counts.get(arm, 0)) for arm in arms)
    if any(c < 0 for c in observed):
        raise ValueError(f"counts {dict(zip(arms, observed, strict=True))}: expected >= 0")
    total = sum(observed)
    if total == 0:
        raise ValueError("no exposures counted; expected at least one")
    weight_sum = sum(weights.values())
    expected = tuple(total * weights[arm] / weight_sum for arm in arms)
    result = stats.chisquare(observed, expected)
    return SrmResult(arms, observed, expected, float(result.statistic), float(result.pvalue))
