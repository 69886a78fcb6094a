"""What a simulated user does with one served page: how far they scroll, what they click and
order, and when. The clicks and orders come from the world's own response model
(:func:`recsys.worldgen.response_logits` and :func:`recsys.worldgen.respond`, with the build's
calibration), so the simulator and the build's log draw from one function; position bias is
part of that model (the logit falls with ``log1p(position)``), and an item below the scroll
depth is never seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.special import expit

from recsys.worldgen import ResponseBias, Shown, WorldTruth, respond, response_logits

ALWAYS_SEEN = 3
"""The first slots are on screen when the feed opens."""
SCROLL_STOP = 0.08
"""After them, the chance the user stops scrolling at each further slot."""
SCROLL_SECONDS = 1.5
"""Simulated seconds per slot scrolled past before an item is on screen."""
CLICK_DELAY = (np.log(8.0), 1.0)
"""Log-normal (mu, sigma) of simulated seconds from seeing an item to opening it."""
ORDER_DELAY = (np.log(120.0), 0.6)
"""Log-normal (mu, sigma) of simulated seconds from opening an item to the order."""
MAX_DELAY_SECONDS = 900.0
"""Every delay is capped here (bounds how long a run waits for its last events)."""


@dataclass(frozen=True)
class Reaction:
    """One page: arrays aligned with the served items, delays in simulated seconds after the
    response."""

    impressed: npt.NDArray[np.bool_]
    clicked: npt.NDArray[np.bool_]
    ordered: npt.NDArray[np.bool_]
    impression_at: npt.NDArray[np.float64]
    click_at: npt.NDArray[np.float64]
    order_at: npt.NDArray[np.float64]


@dataclass(frozen=True)
class Page:
    """One served page: ``items`` in served order, shown to ``user`` (world row) at ``hour``,
    delivering to ``(lat, lon)``."""

    user: int
    items: npt.NDArray[np.int64]
    hour: int
    lat: float
    lon: float


def page_logits(
    truth: WorldTruth, page: Page
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Click and order logits of the page's items: the world's response model, position bias
    included."""
    n = page.items.shape[0]
    shown = Shown(
        user=np.full(n, page.user, np.int64),
        item=page.items,
        position=np.arange(n),
        hour=np.full(n, page.hour, np.int64),
        lat=np.full(n, page.lat),
        lon=np.full(n, page.lon),
    )
    return response_logits(truth, shown)


def click_probability(
    click_logit: npt.NDArray[np.float64], bias: ResponseBias
) -> npt.NDArray[np.float64]:
    return np.asarray(expit(click_logit + bias.click), np.float64)


def react(
    rng: np.random.Generator,
    click_logit: npt.NDArray[np.float64],
    order_logit: npt.NDArray[np.float64],
    bias: ResponseBias,
) -> Reaction:
    """Draw one page's reaction: the scroll depth, then clicks and orders (:func:`respond`)."""
    n = click_logit.shape[0]
    position = np.arange(n)
    depth = ALWAYS_SEEN + rng.geometric(SCROLL_STOP) - 1
    impressed = position < depth
    clicked, ordered, _ = respond(rng, click_logit, order_logit, bias)
    clicked &= impressed
    ordered &= clicked
    impression_at = np.maximum(position - ALWAYS_SEEN + 1, 0) * SCROLL_SECONDS + 0.5
    click_at = impression_at + rng.lognormal(*CLICK_DELAY, n)
    order_at = click_at + rng.lognormal(*ORDER_DELAY, n)
    cap = MAX_DELAY_SECONDS
    return Reaction(
        impressed=impressed,
        clicked=clicked,
        ordered=ordered,
        impression_at=np.minimum(impression_at, cap),
        click_at=np.minimum(click_at, cap),
        order_at=np.minimum(order_at, cap),
    )
