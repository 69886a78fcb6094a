"""Outcomes: what users did with what they were shown (events, sinks, reader, join).

See docs/outcomes.md and the contract in :mod:`recsys.outcomes.events` and
:mod:`recsys.outcomes.join`.
"""

from recsys.outcomes.events import (
    EVENT_KINDS,
    OUTCOME_VERSION,
    EventKind,
    InvalidOutcome,
    OutcomeEvent,
    encode_events,
)
from recsys.outcomes.join import (
    DEFAULT_LATE_SECONDS,
    JoinedRequest,
    JoinStats,
    OutcomeJoiner,
    join_outcomes,
)
from recsys.outcomes.reader import OutcomeReadStats, iter_outcomes
from recsys.outcomes.sinks import (
    DEFAULT_STREAM,
    OUTCOME_PREFIX,
    OutcomeLog,
    default_outcome_dir,
    open_outcome_writer,
)

__all__ = [
    "DEFAULT_LATE_SECONDS",
    "DEFAULT_STREAM",
    "EVENT_KINDS",
    "OUTCOME_PREFIX",
    "OUTCOME_VERSION",
    "EventKind",
    "InvalidOutcome",
    "JoinStats",
    "JoinedRequest",
    "OutcomeEvent",
    "OutcomeJoiner",
    "OutcomeLog",
    "OutcomeReadStats",
    "default_outcome_dir",
    "encode_events",
    "iter_outcomes",
    "join_outcomes",
    "open_outcome_writer",
]
