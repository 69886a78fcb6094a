"""The assign stage: each request's experiment exposures and merged pipeline parameters.

Runs at the head of the batched stages, for the whole batch in one vectorised pass
(:meth:`~recsys.experiments.assignment.Assigner.assign_many`): cost O(layers) per request,
never O(experiments). A batch that already carries its assignments (a replay, or a warm-up
pinning a model version) keeps them.
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
        if len(batch.assignments) == len(batch.requests):
            return batch  # assigned already: kept as they are
        return replace(
            batch,
            assignments=tuple(
                snapshot.assigner.assign_many(
                    [r.user_id for r in batch.requests],
                    [
                        RequestAttributes(
                            surface=r.surface,
                            platform=r.platform,
                            has_location=r.location is not None,
                        )
                        for r in batch.requests
                    ],
                )
            ),
        )
