"""The traffic plan: who opens the app when, where, on which surface, and how often they refresh.

Planned up front from the seed (so a seed gives the same sessions whatever the server answers):

- a population of ``users`` drawn from the world;
- session starts as a Poisson process in wall time whose rate follows the world's time-of-day
  shape (the users' own hour profiles: a lunch peak and a dinner peak), ``rate`` sessions per
  wall second at the busiest hour, the simulated clock running ``speed`` times the wall clock;
- per session, a user drawn by activity and by how likely they are to order at that hour; the
  delivery address near home (most sessions), elsewhere in the city (work, friends), or not
  shared; a surface and a platform; and 0-3 feed refreshes some simulated seconds apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from recsys.worldgen import HOUR_MODES, KM_PER_DEGREE, WorldTruth

SURFACES = ("home", "search", "category")
SURFACE_SHARES = np.array([0.8, 0.1, 0.1])
PLATFORMS = ("ios", "android", "web")
PLATFORM_SHARES = np.array([0.45, 0.45, 0.10])
AWAY_SHARE = 0.15
NO_LOCATION_SHARE = 0.05
REFRESH_PROBABILITY = 0.35
MAX_PAGES = 4
REFRESH_GAP_SECONDS = (15.0, 90.0)
"""A refresh comes this many simulated seconds after the previous page (uniform)."""


@dataclass(frozen=True)
class TrafficPlan:
    """One entry per session, ordered by start."""

    start: npt.NDArray[np.float64]
    """Wall seconds after the run starts."""
    user: npt.NDArray[np.int64]
    """World user rows."""
    hour: npt.NDArray[np.int64]
    """Simulated local hour at the start."""
    has_location: npt.NDArray[np.bool_]
    lat: npt.NDArray[np.float64]
    lon: npt.NDArray[np.float64]
    surface: npt.NDArray[np.int64]
    platform: npt.NDArray[np.int64]
    pages: npt.NDArray[np.int64]
    """Feed requests in the session (1 + refreshes)."""
    refresh_gap: npt.NDArray[np.float64]
    """Simulated seconds between pages."""

    @property
    def sessions(self) -> int:
        return int(self.start.shape[0])

    @property
    def requests(self) -> int:
        return int(self.pages.sum())


def hour_density(
    truth: WorldTruth, users: npt.NDArray[np.int64], hour: float
) -> npt.NDArray[np.float64]:
    """[len(users)] how likely each user is to open the app at ``hour`` (activity x profile)."""
    centre, sd = HOUR_MODES[:, 0], HOUR_MODES[:, 1]
    gap = np.abs(((hour - centre) + 12.0) % 24.0 - 12.0)  # circular distance in hours
    mode = np.exp(-0.5 * (gap / sd) ** 2) / sd
    tastes = truth.tastes
    return np.asarray(tastes.activity[users] * (tastes.hour_profile[users] @ mode), np.float64)


def plan_traffic(
    truth: WorldTruth,
    rng: np.random.Generator,
    *,
    users: int,
    seconds: float,
    rate: float,
    speed: float,
    start_hour: float,
    max_requests: int,
) -> TrafficPlan:
    """Sessions for ``seconds`` of wall time (at most ``max_requests`` feed requests)."""
    n_world = truth.users.n_users
    population = np.sort(rng.choice(n_world, min(users, n_world), replace=False)).astype(np.int64)
    hours = np.arange(24, dtype=np.float64)
    by_hour = np.stack([hour_density(truth, population, h) for h in hours])  # [24, P]
    shape = by_hour.sum(axis=1)
    shape /= shape.max()

    # Session starts: a Poisson process at the peak rate, thinned by the hour's share of it.
    expected = int(rate * seconds * 1.2) + 16
    gaps = rng.exponential(1.0 / rate, expected)
    start = np.cumsum(gaps)
    start = start[start < seconds]
    sim_hour = (start_hour + start * speed / 3600.0) % 24.0
    hour = np.floor(sim_hour).astype(np.int64)
    keep = rng.random(start.shape[0]) < shape[hour]
    start, hour = start[keep], hour[keep]
    n = start.shape[0]

    # Who: by activity and hour profile, from the hour's row of the table.
    user = np.empty(n, np.int64)
    for h in np.unique(hour):  # at most 24 hours
        rows = np.flatnonzero(hour == h)
        cum = np.cumsum(by_hour[h])
        pick = np.searchsorted(cum, rng.random(rows.shape[0]) * cum[-1], side="right")
        user[rows] = population[np.minimum(pick, population.shape[0] - 1)]

    # Where: near home, elsewhere in the city, or not shared.
    away = rng.random(n) < AWAY_SHARE
    district = rng.choice(truth.districts.lat.shape[0], n, p=truth.districts.weight)
    base_lat = np.where(away, truth.districts.lat[district], truth.users.home_lat[user])
    base_lon = np.where(away, truth.districts.lon[district], truth.users.home_lon[user])
    spread_km = np.where(away, 1.0, 0.25)
    lat = base_lat + rng.normal(0.0, 1.0, n) * spread_km / KM_PER_DEGREE
    lon = base_lon + rng.normal(0.0, 1.0, n) * spread_km / (
        KM_PER_DEGREE * np.cos(np.radians(base_lat))
    )
    has_location = rng.random(n) >= NO_LOCATION_SHARE

    surface = rng.choice(len(SURFACES), n, p=SURFACE_SHARES)
    platform = rng.choice(len(PLATFORMS), n, p=PLATFORM_SHARES)
    pages = np.minimum(1 + rng.geometric(1.0 - REFRESH_PROBABILITY, n) - 1, MAX_PAGES)
    refresh_gap = rng.uniform(*REFRESH_GAP_SECONDS, n)

    # Bounded: the sessions whose requests fit in max_requests.
    fits = np.cumsum(pages) <= max_requests
    return TrafficPlan(
        start=start[fits],
        user=user[fits],
        hour=hour[fits],
        has_location=has_location[fits],
        lat=lat[fits],
        lon=lon[fits],
        surface=surface[fits].astype(np.int64),
        platform=platform[fits].astype(np.int64),
        pages=pages[fits].astype(np.int64),
        refresh_gap=refresh_gap[fits],
    )
