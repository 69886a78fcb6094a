"""The assign stage: each request's experiment exposures and merged pipeline parameters.

Runs per request on the event loop, before the result cache (whose key depends on the arms):
cost O(layers), never O(experiments).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

from recsys.experiments.assignment import Assigner, RequestAttributes
from recsys.stage import Batch


class AssignSnapshot(Protocol):
    """The part of the serving snapshot the assign stage reads."""

    @property
    def assigner(self) -> Assigner: ...


class Assign:
    name = "assign"

    def run(self, batch: Batch, snapshot: AssignSnapshot) -> Batch:
        assigner = snapshot.assigner
        return replace(
            batch,
            assignments=tuple(
                assigner.assign(
                    r.user_id,
                    RequestAttributes(
                        surface=r.surface,
                        platform=r.platform,
                        has_location=r.location is not None,
                    ),
                )
                for r in batch.requests
            ),
        )
