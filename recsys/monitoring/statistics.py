"""Distribution distances and interval estimates the monitor reports.

PSI (population stability index) is the industry's drift figure: ``sum((a - e) * ln(a / e))``
over bins, with ``a`` the live share and ``e`` the baseline share of each bin; the usual reading
is < 0.1 stable, 0.1-0.2 moderate, > 0.2 a significant shift. Empty bins would make it infinite,
so shares are floored at :data:`SHARE_FLOOR` (the common convention) before it is computed.
Jensen-Shannon comes from scipy (``scipy.spatial.distance.jensenshannon``: the square root of
the divergence, base 2, so 0..1): it is bounded and symmetric, which makes it a steadier second
opinion than PSI when a bin is nearly empty on one side.

Rates (CTR, order rate) carry Wilson score intervals: unlike the normal approximation they stay
inside [0, 1] and keep their coverage at the small counts a new arm starts with.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from scipy.spatial.distance import jensenshannon

SHARE_FLOOR = 1e-4
"""Smallest share a bin takes in PSI (an empty bin would make the logarithm infinite)."""
Z_95 = 1.959963984540054
"""Two-sided 95% normal quantile."""


def shares(counts: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """``counts`` as shares of their total (all zeros when the total is 0)."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    return c / total if total > 0 else np.zeros_like(c)


def psi(live: npt.ArrayLike, baseline: npt.ArrayLike) -> float:
    """Population stability index of the ``live`` bin counts against the ``baseline`` counts
    (same bins). NaN when either side is empty."""
    a, e = np.asarray(live, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != e.shape:
        raise ValueError(f"live has {a.shape} bins, baseline {e.shape}: expected the same bins")
    if a.sum() <= 0 or e.sum() <= 0:
        return math.nan
    pa = np.maximum(shares(a), SHARE_FLOOR)
    pe = np.maximum(shares(e), SHARE_FLOOR)
    return float(np.sum((pa - pe) * np.log(pa / pe)))


def js_distance(live: npt.ArrayLike, baseline: npt.ArrayLike) -> float:
    """Jensen-Shannon distance (base 2, 0..1) between two bin-count vectors; NaN if one is
    empty."""
    a, e = np.asarray(live, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != e.shape:
        raise ValueError(f"live has {a.shape} bins, baseline {e.shape}: expected the same bins")
    if a.sum() <= 0 or e.sum() <= 0:
        return math.nan
    return float(jensenshannon(a, e, base=2))


def wilson_interval(successes: float, trials: float, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; (nan, nan) with no trials."""
    if trials <= 0:
        return (math.nan, math.nan)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: npt.ArrayLike, z: float = Z_95) -> tuple[float, float, float]:
    """Mean and normal-approximation interval of per-request values (NDCG@20 of each request
    with an outcome: bounded in [0, 1], so the central limit holds at the counts we alert on)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return (math.nan, math.nan, math.nan)
    mean = float(v.mean())
    if v.size < 2:
        return (mean, math.nan, math.nan)
    half = z * float(v.std(ddof=1)) / math.sqrt(v.size)
    return (mean, max(0.0, mean - half), min(1.0, mean + half))
