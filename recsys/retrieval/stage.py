"""The retrieve stage: candidates for the whole batch from one FAISS search (retriever.py).

Deliverability always applies: a request without a location is served at its user's home (the
user-features stage puts it on the batch as ``delivery``); only an unknown user without a
location gets the popular items of the whole city, flagged :data:`NO_LOCATION`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

from recsys.retrieval.retriever import RetrievalQuery, Retriever
from recsys.stage import Batch
from recsys.types import Location

UNKNOWN_USER = "unknown user: popular items near the location"
"""Degraded reason of a request whose user has no vector: popular items near the location."""
NO_LOCATION = "no location and no known home: popular items of the whole city"
"""Degraded reason of an unknown user's request without a location: nothing says where it
delivers to, so no delivery radius could be applied."""


class RetrieveSnapshot(Protocol):
    """The part of the serving snapshot the retrieve stage reads."""

    @property
    def retriever(self) -> Retriever: ...


class Retrieve:
    """Needs ``assignments`` and ``user_rows``; uses ``user_vectors`` when a store served them."""

    name = "retrieve"

    def run(self, batch: Batch, snapshot: RetrieveSnapshot) -> Batch:
        locations = _locations(batch)
        queries = [
            RetrievalQuery(
                user_row=int(row),
                location=location,
                k=assignment.params.retrieval_k,
                nprobe=assignment.params.nprobe,
                radius_km=assignment.params.radius_km,
                exclude=request.exclude_sku_ids,
            )
            for request, assignment, row, location in zip(
                batch.requests, batch.assignments, batch.user_rows.tolist(), locations, strict=True
            )
        ]
        candidates = tuple(snapshot.retriever.retrieve_batch(queries, batch.user_vectors))
        batch = replace(batch, candidates=candidates)
        batch = batch.with_degraded([c.fallback for c in candidates], UNKNOWN_USER)
        return batch.with_degraded([loc is None for loc in locations], NO_LOCATION)


def _locations(batch: Batch) -> list[Location | None]:
    """Where each request delivers to: the batch's ``delivery`` (the request's location, else
    the user's home), or the request's own location if no stage set it."""
    if batch.delivery is None:
        return [r.location for r in batch.requests]
    return [
        None if lat != lat else Location(lat, lon)  # NaN: unknown user, no location
        for lat, lon in batch.delivery.tolist()
    ]
