"""The request path, built in one place: which stages run, in which order, and where.

Two lists of the same shape (:class:`recsys.stage.Stage`):

- ``per_request`` runs on the event loop for each request as it arrives, after the result
  cache lookup (a hit runs no stage): cheap work that must precede batching, if any; the
  served plan has none;
- ``batched`` runs in an executor thread over a micro-batch of requests: one vectorised
  experiment assignment, one feature-store read, one FAISS search, one predict per model
  version.

A new concern (a monitoring tap, a candidate logger) is one more object in one of these lists.
"""

from __future__ import annotations

from dataclasses import dataclass

from recsys.experiments.stage import Assign
from recsys.monitoring.stage import Monitor
from recsys.pipeline.arrange import Arrange
from recsys.pipeline.capture import Capture
from recsys.pipeline.snapshot import ServingSnapshot
from recsys.ranking.stages import Rank, UserFeatures
from recsys.retrieval.stage import Retrieve
from recsys.stage import Stage


@dataclass(frozen=True)
class StagePlan:
    per_request: tuple[Stage[ServingSnapshot], ...]
    batched: tuple[Stage[ServingSnapshot], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in (*self.per_request, *self.batched))


def build_stages(candidate_share: float = 0.0) -> StagePlan:
    """(batch) assign -> features -> retrieve -> rank -> arrange -> capture -> monitor.

    Assignment runs with the batch, not per request on the event loop: one vectorised pass
    over the batch's requests costs less than one per request, and the loop is the server's
    one serial thread.

    ``candidate_share``: the share of requests whose exposure record keeps every ranked
    candidate (``--exposure-candidates-share``).
    """
    return StagePlan(
        per_request=(),
        batched=(
            Assign(),
            UserFeatures(),
            Retrieve(),
            Rank(),
            Arrange(),
            Capture(candidate_share),
            Monitor(),
        ),
    )
