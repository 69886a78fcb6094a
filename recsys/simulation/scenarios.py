"""Scenarios: how the world changes at the onset while the served models stay as they are.

Each scenario turns the world's hidden truth into the truth after the onset (:meth:`shift`),
and may name a fault to inject into the online feature store (``broken-feature``). Every draw
comes from the generator it is given, so a seed gives the same change. The registry
:data:`SCENARIOS` maps each name to its class; :func:`make_scenario` refuses an unknown name
with one line listing the valid ones. Documented in docs/outcomes.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Final, Literal, Protocol

import numpy as np

from recsys.geo import haversine_km
from recsys.world import CUISINES, InteractionLog
from recsys.worldgen import WorldTruth


class UnknownScenario(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(f"--scenario {name!r}: expected one of {', '.join(SCENARIOS)}")


FaultMode = Literal["nan", "constant"]

USER_ROW_TAIL: Final = ("user_price_mean", "user_activity", "user_home_lat", "user_home_lon")
"""The named scalar columns at the end of a user's feature row (ranking.features
.user_feature_rows), after the vector and the per-cuisine affinities."""


@dataclass(frozen=True)
class FeatureFault:
    """One column of every user's row in the online feature store, broken at the onset."""

    column: str
    """One of :data:`USER_ROW_TAIL`."""
    mode: FaultMode
    """``nan``: the pipeline writes NaN; ``constant``: it writes ``value`` for everyone."""
    value: float = 0.0

    def index(self, row_width: int) -> int:
        """The column's position in a row of ``row_width`` columns."""
        return row_width - len(USER_ROW_TAIL) + USER_ROW_TAIL.index(self.column)


@dataclass(frozen=True)
class Shift:
    """What the scenario changes at its onset."""

    truth: WorldTruth
    """The world after the onset (the same object when the world does not change)."""
    fault: FeatureFault | None = None
    summary: str = ""
    """One line saying what changed, for the run's report."""


class Scenario(Protocol):
    name: ClassVar[str]

    def shift(self, truth: WorldTruth, log: InteractionLog, rng: np.random.Generator) -> Shift:
        """The world after the onset; ``log`` is the build's (what the models learned from)."""
        ...


@dataclass(frozen=True)
class NoChange:
    """``none``: the control; nothing changes."""

    name: ClassVar[str] = "none"

    def shift(self, truth: WorldTruth, log: InteractionLog, rng: np.random.Generator) -> Shift:
        return Shift(truth, summary="nothing changes")


@dataclass(frozen=True)
class TasteShift:
    """``taste-shift``: a cuisine trend. ``trend_cuisines`` cuisines drawn from the less
    popular half (by the build's log: what the models saw little of) come into fashion:
    ``share`` of the users move their taste vector ``strength`` of the way towards the trend's
    latent direction (``scale`` times the mean of its cuisines' vectors), away from what they
    liked when the models were trained."""

    name: ClassVar[str] = "taste-shift"
    trend_cuisines: int = 2
    share: float = 0.8
    strength: float = 0.8
    scale: float = 2.5

    def shift(self, truth: WorldTruth, log: InteractionLog, rng: np.random.Generator) -> Shift:
        catalogue = truth.catalogue
        cuisine = catalogue.restaurant_cuisine[catalogue.item_restaurant[np.asarray(log.item)]]
        seen = np.bincount(cuisine, minlength=len(CUISINES))
        rare = np.argsort(seen, kind="stable")[: len(CUISINES) // 2]
        trend = np.sort(rng.choice(rare, self.trend_cuisines, replace=False))
        movers = rng.random(truth.users.n_users) < self.share
        target = self.scale * truth.latents.cuisine[trend].mean(axis=0)
        taste = truth.tastes.taste.astype(np.float64)
        taste[movers] = (1 - self.strength) * taste[movers] + self.strength * target
        tastes = replace(truth.tastes, taste=taste.astype(np.float32))
        names = ", ".join(CUISINES[i] for i in trend)
        return Shift(
            replace(truth, tastes=tastes),
            summary=f"{int(movers.sum()):,} users' tastes move towards {names}",
        )


@dataclass(frozen=True)
class PriceInflation:
    """``price-inflation``: the restaurants of ``share`` of the catalogue raise every price by
    ``factor``; the catalogue the models know keeps the old prices."""

    name: ClassVar[str] = "price-inflation"
    factor: float = 1.5
    share: float = 1.0

    def shift(self, truth: WorldTruth, log: InteractionLog, rng: np.random.Generator) -> Shift:
        catalogue = truth.catalogue
        raising = rng.random(catalogue.n_restaurants) < self.share
        factor = np.where(raising[catalogue.item_restaurant], self.factor, 1.0)
        prices = (catalogue.item_price * factor).astype(np.float32)
        return Shift(
            replace(truth, catalogue=replace(catalogue, item_price=prices)),
            summary=f"{int(raising.sum()):,} restaurants raise prices x{self.factor:g}",
        )


@dataclass(frozen=True)
class BrokenFeature:
    """``broken-feature``: the feature pipeline breaks one column of the users' rows in the
    online store (NaN, or one constant for everyone). The world does not change; the server
    must be serving from the online store (``recsys serve --feature-store``)."""

    name: ClassVar[str] = "broken-feature"
    column: str = "user_price_mean"
    mode: FaultMode = "nan"
    value: float = 0.0

    def shift(self, truth: WorldTruth, log: InteractionLog, rng: np.random.Generator) -> Shift:
        if self.column not in USER_ROW_TAIL:
            raise ValueError(
                f"broken-feature column {self.column!r}: expected one of {', '.join(USER_ROW_TAIL)}"
            )
        fault = FeatureFault(self.column, self.mode, self.value)
        what = "NaN" if self.mode == "nan" else f"constant {self.value:g}"
        return Shift(truth, fault, summary=f"online store column {self.column} becomes {what}")


@dataclass(frozen=True)
class NewRestaurants:
    """``new-restaurants``: ``share`` of the restaurants, those the build's log showed least
    (cold for the models: little popularity or click history), relaunch as new places: open,
    every item available, ``quality_boost`` more quality, and the users living within
    ``radius_km`` of one take to it (their taste moves ``pull`` of the way to the nearest new
    place's latent vector). The feed keeps ranking the old favourites it learned."""

    name: ClassVar[str] = "new-restaurants"
    share: float = 0.1
    quality_boost: float = 1.5
    radius_km: float = 3.0
    pull: float = 0.7

    def shift(self, truth: WorldTruth, log: InteractionLog, rng: np.random.Generator) -> Shift:
        catalogue = truth.catalogue
        shown = np.bincount(
            catalogue.item_restaurant[np.asarray(log.item)], minlength=catalogue.n_restaurants
        )
        count = max(1, round(self.share * catalogue.n_restaurants))
        # Fewest impressions first; ties in a random order of the seed.
        cold = np.lexsort((rng.random(catalogue.n_restaurants), shown))[:count]
        is_new = np.zeros(catalogue.n_restaurants, np.bool_)
        is_new[cold] = True
        quality = truth.items.restaurant_quality.copy()
        quality[is_new] += self.quality_boost
        new_catalogue = replace(
            catalogue,
            restaurant_is_open=catalogue.restaurant_is_open | is_new,
            item_available=catalogue.item_available | is_new[catalogue.item_restaurant],
        )
        users = truth.users
        nearest = np.empty(users.n_users, np.int64)
        distance = np.empty(users.n_users)
        for lo in range(0, users.n_users, 4096):  # bounded [users, new] distance blocks
            rows = slice(lo, lo + 4096)
            km = haversine_km(
                users.home_lat[rows, None],
                users.home_lon[rows, None],
                catalogue.restaurant_lat[cold][None, :],
                catalogue.restaurant_lon[cold][None, :],
            )
            nearest[rows] = cold[np.argmin(km, axis=1)]
            distance[rows] = km.min(axis=1)
        fans = distance <= self.radius_km
        taste = truth.tastes.taste.astype(np.float64)
        target = 1.8 * truth.items.restaurant_latent[nearest[fans]]
        taste[fans] = (1 - self.pull) * taste[fans] + self.pull * target
        return Shift(
            replace(
                truth,
                catalogue=new_catalogue,
                items=replace(truth.items, restaurant_quality=quality),
                tastes=replace(truth.tastes, taste=taste.astype(np.float32)),
            ),
            summary=f"{count:,} cold restaurants relaunch ({int(shown[cold].sum()):,} "
            f"impressions in the training log); {int(fans.sum()):,} users nearby take to them",
        )


SCENARIOS: Final[dict[str, type[Scenario]]] = {
    cls.name: cls for cls in (NoChange, TasteShift, PriceInflation, BrokenFeature, NewRestaurants)
}


def make_scenario(name: str) -> Scenario:
    """The scenario ``name`` with its default parameters; :class:`UnknownScenario` otherwise."""
    cls = SCENARIOS.get(name)
    if cls is None:
        raise UnknownScenario(name)
    return cls()
