"""Reading outcome events back from a directory of rotating files (plain and gzip)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from recsys.linelog.reading import LineReadStats, iter_log_lines
from recsys.outcomes.events import InvalidOutcome, OutcomeEvent


@dataclass
class OutcomeReadStats(LineReadStats):
    """What :func:`iter_outcomes` read and skipped; ``invalid``: JSON objects that are not
    outcome events (a wrong type or version, a missing or ill-typed field)."""

    invalid: int = 0
    outside: int = 0
    """Events outside ``[since, until)``."""


def iter_outcomes(
    directory: Path,
    since: float | None = None,
    until: float | None = None,
    *,
    stats: OutcomeReadStats | None = None,
) -> Iterator[OutcomeEvent]:
    """Every outcome event in ``directory`` with ``since <= ts < until``, oldest file first
    (mirrors :func:`recsys.serving.exposure.iter_exposure_lines`); files last written before
    ``since`` are not opened (their events are not counted in ``stats``)."""
    counts = OutcomeReadStats() if stats is None else stats
    for _path, _number, record in iter_log_lines(directory, counts, modified_since=since):
        try:
            event = OutcomeEvent.from_record(record)
        except InvalidOutcome:
            counts.invalid += 1
            continue
        if (since is not None and event.ts < since) or (until is not None and event.ts >= until):
            counts.outside += 1
            continue
        yield event
