"""A sequential test for the difference of two proportions, valid however often it is looked at.

A canary is watched every minute; a fixed-n test peeked at every minute rejects far more often
than its alpha (benchmarks/bench_canary.py measures how much). This is the mixture sequential
probability ratio test (mSPRT) of Johari, Koomen, Pekelis and Walsh ("Always valid inference:
continuous monitoring of A/B tests", Operations Research 2022), on the normal approximation of
the difference of two proportions: with ``d = rate_canary - rate_champion``, its variance ``V``
(plug-in per arm: ``p(1-p)/n``, or a larger user-level variance when the trials cluster by user,
:func:`clustered_variance`) and a normal mixture ``N(theta0, tau^2)`` over the alternative,

    Lambda = sqrt(V / (V + tau^2)) * exp(tau^2 (d - theta0)^2 / (2 V (V + tau^2)))

is a likelihood ratio martingale under ``theta = theta0``, so by Ville's inequality
``P(sup_n Lambda_n >= 1/alpha) <= alpha``: the always-valid p-value ``min over looks of
1/Lambda`` may be read at every look. Two such tests run side by side:

- **harm** (``theta0 = 0``, acted on only when ``d < 0``): the canary is worse than the
  champion. Rejecting it when the two are equal (a false rollback) has probability <= alpha.
- **non-inferiority** (``theta0 = -margin``, acted on only when ``d > -margin``): the canary is
  not worse than the champion by the margin. Rejecting it when the canary is worse by the margin
  or more (a false promotion) has probability <= alpha.

Everything is vectorised over leading axes (many simulated canaries at once in the benchmark
and the property tests). The normal approximation wants a few successes and failures per arm:
below ``min_successes`` in either arm a look changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]


def log_mixture_ratio(
    difference: npt.ArrayLike, theta0: npt.ArrayLike, variance: npt.ArrayLike, tau2: npt.ArrayLike
) -> Array:
    """log Lambda of the normal-mixture SPRT (module docstring), elementwise."""
    d = np.asarray(difference, dtype=np.float64)
    v = np.asarray(variance, dtype=np.float64)
    t = np.asarray(tau2, dtype=np.float64)
    return np.asarray(
        0.5 * np.log(v / (v + t)) + t * (d - np.asarray(theta0)) ** 2 / (2.0 * v * (v + t)),
        dtype=np.float64,
    )


@dataclass(frozen=True)
class Look:
    """One look at cumulative counts: the evidence and the always-valid p-values so far."""

    champion_rate: Array
    canary_rate: Array
    difference: Array
    margin: Array
    p_harm: Array
    """Always-valid p-value of "canary not worse than champion" (small: it is worse)."""
    p_noninferior: Array
    """Always-valid p-value of "canary worse by the margin or more" (small: it is not)."""


class MixtureSPRT:
    """The two one-directional mSPRTs of the module docstring with a relative margin.

    ``margin`` is relative to the champion's rate (0.05: the canary may be up to 5% worse and
    still count as not worse); ``tau`` is the mixture's scale relative to the champion's rate
    (default: the margin), the size of effect the test is tuned to find quickly.
    """

    def __init__(
        self, alpha: float, margin: float, tau: float | None = None, min_successes: int = 5
    ) -> None:
        if not 0 < alpha < 1:
            raise ValueError(f"alpha: expected a number in (0, 1), got {alpha}")
        if not 0 < margin < 1:
            raise ValueError(f"margin: expected a number in (0, 1), got {margin}")
        self.alpha = alpha
        self.margin = margin
        self.tau = margin if tau is None else tau
        self.min_successes = min_successes

    def describe(self) -> str:
        return (
            f"mixture SPRT on the difference of two proportions (normal mixture, tau = "
            f"{self.tau:g} x champion rate), always-valid p-values, alpha {self.alpha:g} per "
            f"direction, non-inferiority margin {self.margin:.0%}"
        )

    def look(
        self,
        champion: tuple[npt.ArrayLike, npt.ArrayLike],
        canary: tuple[npt.ArrayLike, npt.ArrayLike],
        previous: tuple[npt.ArrayLike, npt.ArrayLike] = (1.0, 1.0),
        variances: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
    ) -> Look:
        """Cumulative (successes, trials) per arm; ``previous`` (p_harm, p_noninferior) of the
        last look (the p-values only go down).

        ``variances`` (champion's, canary's): the variance of each arm's rate when its trials
        are not independent, such as the user-level variance of :func:`clustered_variance`
        (requests of one user succeed together). The larger of it and the binomial
        ``p(1-p)/n`` is used (NaN: no estimate, the binomial); without it, the binomial."""
        x_a, n_a = (np.asarray(v, dtype=np.float64) for v in champion)
        x_b, n_b = (np.asarray(v, dtype=np.float64) for v in canary)
        with np.errstate(divide="ignore", invalid="ignore"):
            rate_a = np.where(n_a > 0, x_a / np.maximum(n_a, 1), 0.0)
            rate_b = np.where(n_b > 0, x_b / np.maximum(n_b, 1), 0.0)
            var_a = rate_a * (1 - rate_a) / np.maximum(n_a, 1)
            var_b = rate_b * (1 - rate_b) / np.maximum(n_b, 1)
            if variances is not None:
                var_a = np.fmax(var_a, np.asarray(variances[0], dtype=np.float64))
                var_b = np.fmax(var_b, np.asarray(variances[1], dtype=np.float64))
            variance = var_a + var_b
            difference = rate_b - rate_a
            margin = self.margin * rate_a
            tau2 = (self.tau * rate_a) ** 2
            enough = (
                (np.minimum(x_a, n_a - x_a) >= self.min_successes)
                & (np.minimum(x_b, n_b - x_b) >= self.min_successes)
                & (variance > 0)
                & (tau2 > 0)
            )
            safe_v = np.where(enough, variance, 1.0)
            safe_t = np.where(enough, tau2, 1.0)
            log_harm = log_mixture_ratio(difference, 0.0, safe_v, safe_t)
            log_noninf = log_mixture_ratio(difference, -margin, safe_v, safe_t)
        p_harm = np.where(enough & (difference < 0), np.exp(-np.maximum(log_harm, 0.0)), 1.0)
        p_noninf = np.where(
            enough & (difference > -margin), np.exp(-np.maximum(log_noninf, 0.0)), 1.0
        )
        return Look(
            champion_rate=rate_a,
            canary_rate=rate_b,
            difference=difference,
            margin=margin,
            p_harm=np.minimum(np.asarray(previous[0], dtype=np.float64), p_harm),
            p_noninferior=np.minimum(np.asarray(previous[1], dtype=np.float64), p_noninf),
        )


def clustered_variance(trials: npt.ArrayLike, successes: npt.ArrayLike) -> float:
    """Variance of the rate ``sum(successes) / sum(trials)`` when the trials come in clusters
    (one user's requests) that are independent of each other but not within: the delta-method
    (cluster-robust) variance of a ratio of sums (Deng, Knoblich and Lu, "Applying the Delta
    Method in Metric Analytics", KDD 2018),

        var = K / (K - 1) * sum_u (x_u - r n_u)^2 / N^2

    with ``n_u``, ``x_u`` the trials and successes of cluster ``u``, ``K`` clusters, ``N`` trials
    and ``r`` the rate. With one trial per cluster it is the binomial ``r(1-r)/N`` (times
    K/(K-1)); when a user's requests succeed together it is larger, as it must be. NaN with
    fewer than two clusters (no estimate)."""
    n = np.asarray(trials, dtype=np.float64)
    x = np.asarray(successes, dtype=np.float64)
    k = n.size
    total = float(n.sum())
    if k < 2 or total <= 0:
        return float("nan")
    rate = float(x.sum()) / total
    residual = x - rate * n
    return float(k / (k - 1) * np.dot(residual, residual) / total**2)
