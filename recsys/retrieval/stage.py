"""The retrieve stage: candidates for the whole batch from one FAISS search (retriever.py)."""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

from recsys.retrieval.retriever import RetrievalQuery, Retriever
from recsys.stage import Batch

UNKNOWN_USER = "unknown user: popular items near the location"
"""Degraded reason of a request whose user has no vector: popular items near the location."""


class RetrieveSnapshot(Protocol):
    """The part of the serving snapshot the retrieve stage reads."""

    @property
    def retriever(self) -> Retriever: ...


class Retrieve:
    """Needs ``assignments`` and ``user_rows``; uses ``user_vectors`` when a store served them."""

    name = "retrieve"

    def run(self, batch: Batch, snapshot: RetrieveSnapshot) -> Batch:
        queries = [
            RetrievalQuery(
                user_row=int(row),
                location=request.location,
                k=assignment.params.retrieval_k,
                nprobe=assignment.params.nprobe,
                radius_km=assignment.params.radius_km,
                exclude=request.exclude_sku_ids,
            )
            for request, assignment, row in zip(
                batch.requests, batch.assignments, batch.user_rows.tolist(), strict=True
            )
        ]
        candidates = tuple(snapshot.retriever.retrieve_batch(queries, batch.user_vectors))
        batch = replace(batch, candidates=candidates)
        return batch.with_degraded([c.fallback for c in candidates], UNKNOWN_USER)
