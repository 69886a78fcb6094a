"""The mixture SPRT: its error control under repeated looks, checked by simulation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.promotion.sequential import MixtureSPRT, log_mixture_ratio

RUNS, LOOKS, PER_LOOK = 1500, 40, 100


def _first_rejections(
    rate_a: float, rate_b: float, seed: int, alpha: float = 0.05, margin: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
    """Per simulated canary: whether harm / non-inferiority was ever declared in LOOKS looks."""
    rng = np.random.default_rng(seed)
    xa = np.cumsum(rng.binomial(PER_LOOK, rate_a, (RUNS, LOOKS)), axis=1)
    xb = np.cumsum(rng.binomial(PER_LOOK, rate_b, (RUNS, LOOKS)), axis=1)
    test = MixtureSPRT(alpha, margin)
    p = (np.ones(RUNS), np.ones(RUNS))
    for k in range(LOOKS):
        n = (k + 1) * PER_LOOK
        look = test.look((xa[:, k], n), (xb[:, k], n), p)
        p = (look.p_harm, look.p_noninferior)
    return p[0] <= alpha, p[1] <= alpha


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.6])
def test_equal_arms_are_rarely_called_worse_however_often_one_looks(rate: float) -> None:
    harm, _ = _first_rejections(rate, rate, seed=int(rate * 100))
    # alpha 0.05; the binomial noise of 1500 runs is about 0.006
    assert harm.mean() <= 0.05


def test_a_canary_worse_by_the_margin_is_rarely_called_not_worse() -> None:
    _, noninferior = _first_rejections(0.3, 0.3 * 0.95, seed=5)
    assert noninferior.mean() <= 0.05


def test_a_clearly_worse_canary_is_caught_and_a_better_one_passes() -> None:
    harm, noninferior = _first_rejections(0.3, 0.24, seed=6)
    assert harm.mean() > 0.9
    assert noninferior.mean() == 0.0
    harm, noninferior = _first_rejections(0.3, 0.33, seed=7)
    assert harm.mean() == 0.0
    assert noninferior.mean() > 0.8


def test_p_values_never_go_up_and_too_little_data_decides_nothing() -> None:
    test = MixtureSPRT(0.05, 0.05)
    first = test.look((3, 10), (0, 10))
    assert first.p_harm == 1.0  # fewer than 5 successes and failures per arm
    strong = test.look((300, 1000), (200, 1000))
    assert strong.p_harm < 0.01
    later = test.look((600, 2000), (600, 2000), (strong.p_harm, strong.p_noninferior))
    assert later.p_harm == strong.p_harm


@settings(max_examples=200, deadline=None)
@given(
    difference=st.floats(-0.5, 0.5),
    variance=st.floats(1e-6, 1.0),
    tau2=st.floats(1e-6, 1.0),
)
def test_the_ratio_is_smallest_at_the_null_and_grows_away_from_it(
    difference: float, variance: float, tau2: float
) -> None:
    at_null = float(log_mixture_ratio(0.0, 0.0, variance, tau2))
    away = float(log_mixture_ratio(difference, 0.0, variance, tau2))
    assert at_null <= 0.0  # Lambda <= 1 when the estimate sits on the null
    assert away >= at_null - 1e-12
