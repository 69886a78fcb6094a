"""The request pipeline: assign -> retrieve -> rank -> arrange, built in one place.

The server (serving/server.py) only knows the :class:`RecommendPipeline` protocol: it opens the
pipeline at start-up, calls ``recommend`` per request and closes it on shutdown.
"""

from __future__ import annotations

from typing import Protocol

from recsys.types import Recommendation, Request, ServingVersions

__all__ = ["RecommendPipeline", "ServingVersions"]


class RecommendPipeline(Protocol):
    async def recommend(self, request: Request) -> Recommendation:
        """Answer one validated request. Never blocks the event loop."""
        ...

    def versions(self) -> ServingVersions: ...

    async def close(self) -> None:
        """Finish in-flight work and release resources."""
        ...
