"""A small real RecommendPipeline for the server tests.

Requests go through a real MicroBatcher into a numpy batch function, so batching metrics, the
executor hand-off and per-item failures are exercised the way the real pipeline uses them.
Some user ids trigger behaviour the tests need: ``boom`` raises, ``full`` is shed as
overloaded, ``hold`` waits until the test releases it.
"""

from __future__ import annotations

import asyncio
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recsys.serving.batching import MicroBatcher, Overloaded
from recsys.serving.metrics import ServingMetrics
from recsys.settings import ServeSettings
from recsys.types import Exposure, Recommendation, Request, ScoredItems, ServingVersions

FAILING_USER = "boom"
OVERLOADED_USER = "full"
HELD_USER = "hold"
MODEL_VERSION = "toy-model-1"
INDEX_VERSION = "toy-index-1"
CONFIG_VERSION = "toy-config-1"
CATALOGUE_SIZE = 100_003


def expected_sku_ids(request: Request) -> np.ndarray:
    """The SKUs the toy pipeline recommends: a user-seeded stride walk, exclusions removed."""
    seed = zlib.crc32(request.user_id.encode())
    walk = (seed + np.arange(request.num_results + len(request.exclude_sku_ids)) * 7_919) % (
        CATALOGUE_SIZE
    )
    kept = walk[~np.isin(walk, np.asarray(request.exclude_sku_ids, dtype=np.int64))]
    return kept[: request.num_results].astype(np.int64)


def _score_batch(requests: list[Request]) -> list[ScoredItems | Exception]:
    results: list[ScoredItems | Exception] = []
    for request in requests:  # a loop over the requests of a batch; items are numpy
        if request.user_id == FAILING_USER:
            results.append(RuntimeError(f"toy ranking failed for {request.user_id}"))
            continue
        sku_ids = expected_sku_ids(request)
        scores = np.linspace(1.0, 0.0, num=sku_ids.size, dtype=np.float32)
        results.append(ScoredItems(sku_ids=sku_ids, restaurant_ids=sku_ids // 20, scores=scores))
    return results


@dataclass
class ToyPipeline:
    metrics: ServingMetrics
    batch_max_size: int
    batch_max_delay_ms: float
    release: asyncio.Event = field(default_factory=asyncio.Event)
    held: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False

    def __post_init__(self) -> None:
        self._batcher: MicroBatcher[Request, ScoredItems] = MicroBatcher(
            _score_batch,
            name="toy",
            max_batch_size=self.batch_max_size,
            max_delay=self.batch_max_delay_ms / 1000,
            observer=self.metrics.observe_batch,
        )

    async def recommend(self, request: Request, deadline: float | None = None) -> Recommendation:
        if request.user_id == OVERLOADED_USER:
            raise Overloaded("toy queue is full")
        if request.user_id == HELD_USER:
            self.held.set()
            await self.release.wait()
        items = await self._batcher.submit(request)
        bucket = zlib.crc32(request.user_id.encode()) % 1000
        return Recommendation(
            request_id=request.request_id,
            items=items,
            model_version=MODEL_VERSION,
            index_version=INDEX_VERSION,
            config_version=CONFIG_VERSION,
            exposures=(
                Exposure("feed", "toy-exp", "treatment" if bucket % 2 else "control", bucket),
            ),
            degraded_reasons=() if request.location else ("no location",),
            stage_seconds=(("retrieve", 0.001), ("rank", 0.002)),
        )

    def versions(self) -> ServingVersions:
        return ServingVersions(INDEX_VERSION, CONFIG_VERSION, {"ranker": MODEL_VERSION})

    def control_from_last_good(self) -> frozenset[str]:
        return frozenset()

    async def close(self) -> None:
        await self._batcher.close()
        self.closed = True


@dataclass
class ToyOpener:
    """``open_pipeline`` for the server; optionally waits on ``gate`` (to test NOT_SERVING)."""

    gate: asyncio.Event | None = None
    error: Exception | None = None
    pipeline: ToyPipeline | None = None

    async def __call__(self, settings: ServeSettings, metrics: ServingMetrics) -> ToyPipeline:
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        metrics.set_control_connected("experiments", True)
        self.pipeline = ToyPipeline(metrics, settings.batch_max_size, settings.batch_max_delay_ms)
        return self.pipeline


async def open_toy(settings: ServeSettings, metrics: ServingMetrics) -> ToyPipeline:
    return await ToyOpener()(settings, metrics)


def toy_settings(tmp_path: Path, **overrides: Any) -> ServeSettings:
    """Settings of a server over the toy pipeline: any port, small batches, its own exposure
    directory under ``tmp_path``."""
    base: dict[str, Any] = {
        "artifacts": tmp_path,
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "batch_max_size": 8,
        "batch_max_delay_ms": 1.0,
        "drain_seconds": 30.0,
        "exposure_dir": tmp_path / "exposures",
        "gc_gen0_threshold": 0,  # the test process's collector stays as it is
    }
    return ServeSettings(**{**base, **overrides})
