"""Online quality per (model version, arm) from joined outcomes: CTR, order rate, NDCG@20.

Input is :class:`recsys.outcomes.join.JoinedRequest` (exposures x outcome events, late events
allowed). Per window and per (model version, arm), and per version over all arms (``all``):

- CTR = clicks / impressions and order rate = orders / impressions, each with a 95 % Wilson
  score interval (items as trials; items of one request are correlated, so the interval is on
  the narrow side, which the CTR-drop alert offsets by requiring the two intervals to separate);
- NDCG@20 of the served order against the user's own labels (2 ordered, 1 clicked, 0 shown, as
  in training), per request with at least one click, averaged, with a normal interval.

Windows are tumbling, by the exposure's ``ts``; only ``complete`` requests (their late window
closed) count, so a window's figures do not change once reported.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from recsys.monitoring.statistics import mean_interval, wilson_interval
from recsys.monitoring.windows import ALL_ARMS
from recsys.outcomes.join import JoinedRequest
from recsys.ranking.evaluation import ndcg_per_group

NDCG_K = 20


def request_arm(joined: JoinedRequest) -> str:
    """The same arm label the drift monitor uses (``recsys.monitoring.stage.arm_label``)."""
    return joined.arm or "none"


@dataclass(frozen=True)
class QualityStats:
    model_version: str
    arm: str
    start: float
    end: float
    requests: int
    impressions: int
    clicks: int
    orders: int
    ctr: float
    ctr_low: float
    ctr_high: float
    order_rate: float
    order_low: float
    order_high: float
    ndcg: float
    ndcg_low: float
    ndcg_high: float
    ndcg_requests: int
    """Requests with at least one click (the ones NDCG is defined for)."""


def _stats(
    version: str, arm: str, start: float, end: float, group: Sequence[JoinedRequest]
) -> QualityStats:
    impressed = np.concatenate([j.impressed for j in group])
    clicked = np.concatenate([j.clicked for j in group])
    ordered = np.concatenate([j.ordered for j in group])
    impressions, clicks, orders = int(impressed.sum()), int(clicked.sum()), int(ordered.sum())
    sizes = np.array([j.sku_ids.size for j in group], dtype=np.int64)
    labels = np.where(ordered, 2, np.where(clicked, 1, 0))
    starts = np.cumsum(sizes) - sizes
    position = np.arange(int(sizes.sum())) - np.repeat(starts, sizes)
    per_request = (
        ndcg_per_group(labels, -position.astype(np.float64), group_sizes=sizes, k=NDCG_K)
        if sizes.sum()
        else np.zeros(0)
    )
    ndcg, ndcg_low, ndcg_high = mean_interval(per_request)
    ctr_low, ctr_high = wilson_interval(clicks, impressions)
    order_low, order_high = wilson_interval(orders, impressions)
    return QualityStats(
        model_version=version,
        arm=arm,
        start=start,
        end=end,
        requests=len(group),
        impressions=impressions,
        clicks=clicks,
        orders=orders,
        ctr=clicks / impressions if impressions else math.nan,
        ctr_low=ctr_low,
        ctr_high=ctr_high,
        order_rate=orders / impressions if impressions else math.nan,
        order_low=order_low,
        order_high=order_high,
        ndcg=ndcg,
        ndcg_low=ndcg_low,
        ndcg_high=ndcg_high,
        ndcg_requests=int((~np.isnan(per_request)).sum()),
    )


def quality_stats(joined: Iterable[JoinedRequest], start: float, end: float) -> list[QualityStats]:
    """Quality of the complete requests in ``joined`` per (version, arm) and (version, all)."""
    groups: dict[tuple[str, str], list[JoinedRequest]] = defaultdict(list)
    for j in joined:
        if not j.complete:
            continue
        groups[(j.model_version, request_arm(j))].append(j)
        groups[(j.model_version, ALL_ARMS)].append(j)
    return [_stats(v, a, start, end, g) for (v, a), g in sorted(groups.items())]


def tumbling_windows(
    joined: Iterable[JoinedRequest], window_seconds: float, origin: float = 0.0
) -> Iterator[list[QualityStats]]:
    """Quality per window of ``window_seconds`` (aligned on ``origin``), in time order; input
    in exposure order (the join's). A window is emitted when a later one begins."""
    current: int | None = None
    batch: list[JoinedRequest] = []
    for j in joined:
        index = int((j.ts - origin) // window_seconds)
        if current is not None and index != current and batch:
            start = origin + current * window_seconds
            yield quality_stats(batch, start, start + window_seconds)
            batch = []
        current = index if current is None else max(current, index)
        batch.append(j)
    if current is not None and batch:
        start = origin + current * window_seconds
        yield quality_stats(batch, start, start + window_seconds)


def quality_record(stats: QualityStats, ts: float) -> dict[str, Any]:
    record: dict[str, Any] = {"type": "quality", "v": 1, "ts": ts}
    for key, value in asdict(stats).items():
        record[key] = None if isinstance(value, float) and math.isnan(value) else value
    return record
