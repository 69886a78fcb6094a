"""The outcome event: what one user did with one item one response showed them.

One JSON object per line (``OUTCOME_VERSION`` 1), written through the same line writers as the
exposure log (:mod:`recsys.linelog`)::

    {"type": "outcome", "v": 1, "request_id": str, "user_id": str, "sku_id": int,
     "position": int, "event": "impression" | "click" | "order", "ts": float}

``position`` is the 0-based slot of the item in the served list; ``ts`` is unix seconds on the
same wall clock as the exposure record's ``ts``. See docs/outcomes.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

import orjson

OUTCOME_VERSION: Final = 1
RECORD_TYPE: Final = "outcome"

EventKind = Literal["impression", "click", "order"]
EVENT_KINDS: Final[tuple[EventKind, ...]] = get_args(EventKind)
"""Every kind of event, in the order a user goes through them."""


class InvalidOutcome(ValueError):
    """A line that is not a valid outcome event; the message names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"outcome {field}: {problem}")
        self.field = field


@dataclass(frozen=True, slots=True)
class OutcomeEvent:
    request_id: str
    user_id: str
    sku_id: int
    position: int
    event: EventKind
    ts: float

    def to_json(self) -> str:
        """One line, newline included."""
        return orjson.dumps(
            {
                "type": RECORD_TYPE,
                "v": OUTCOME_VERSION,
                "request_id": self.request_id,
                "user_id": self.user_id,
                "sku_id": self.sku_id,
                "position": self.position,
                "event": self.event,
                "ts": round(self.ts, 6),
            },
            option=orjson.OPT_APPEND_NEWLINE,
        ).decode()

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> OutcomeEvent:
        """The event a decoded line holds; :class:`InvalidOutcome` names the first bad field."""
        if record.get("type") != RECORD_TYPE:
            raise InvalidOutcome("type", f"is {record.get('type')!r}; expected {RECORD_TYPE!r}")
        if record.get("v") != OUTCOME_VERSION:
            raise InvalidOutcome("v", f"is {record.get('v')!r}; expected {OUTCOME_VERSION}")
        request_id = record.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            raise InvalidOutcome("request_id", "expected a non-empty string")
        user_id = record.get("user_id")
        if not isinstance(user_id, str):
            raise InvalidOutcome("user_id", "expected a string")
        sku_id = record.get("sku_id")
        if not isinstance(sku_id, int) or isinstance(sku_id, bool):
            raise InvalidOutcome("sku_id", f"is {sku_id!r}; expected an integer")
        position = record.get("position")
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise InvalidOutcome("position", f"is {position!r}; expected an integer >= 0")
        event = record.get("event")
        if event not in EVENT_KINDS:
            raise InvalidOutcome("event", f"is {event!r}; expected one of {', '.join(EVENT_KINDS)}")
        ts = record.get("ts")
        if not isinstance(ts, int | float) or isinstance(ts, bool) or ts != ts:
            raise InvalidOutcome("ts", f"is {ts!r}; expected unix seconds")
        return cls(request_id, user_id, sku_id, position, event, float(ts))


def encode_events(events: Sequence[OutcomeEvent]) -> list[str]:
    """The lines a writer takes, one per event."""
    return [event.to_json() for event in events]
