"""A locust gRPC user for recsys: a realistic mix of users, locations and surfaces.

    locust -f loadtest/locustfile.py --headless --host 127.0.0.1:50051 -u 50 -r 50 -t 30s

Each simulated user is a person with the app: they open the home feed from an address (home,
or somewhere else a third of the time), refresh it a few times, sometimes look at the offers
surface, and come back later. Who shows up follows a Zipf law over the user base, so a few
heavy users return often, as in production. Users and their home addresses come from the
world in ``RECSYS_ARTIFACTS`` when it is set (the served world), otherwise ids ``user-0000000``..
around the demo city's centre; 5% are new users the server has never seen.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import grpc
import grpc.experimental.gevent as grpc_gevent  # type: ignore[import-not-found]  # no stubs
from locust import User, between, events, task

from recsys.serving.routing import user_metadata
from recsys.v1 import recommender_pb2, recommender_pb2_grpc

grpc_gevent.init_gevent()  # grpc's own threads would block locust's gevent loop

ZIPF_EXPONENT = 1.1
CENTRE = (52.52, 13.40)
NEW_USER_SHARE = 0.05
TIMEOUT_SECONDS = 2.0


class Population:
    """User ids with home addresses, and a Zipf draw over them."""

    def __init__(self, ids: list[str], homes: list[tuple[float, float]]) -> None:
        self.ids = ids
        self.homes = homes
        weights = [1.0 / (rank + 1) ** ZIPF_EXPONENT for rank in range(len(ids))]
        order = list(range(len(ids)))
        random.Random(7).shuffle(order)  # popularity is not the id order
        self._order = order
        self._weights = weights

    @classmethod
    def load(cls, artifacts: str | None, n: int = 10_000) -> Population:
        if artifacts:
            from recsys.world import load_world

            worlds = sorted((Path(artifacts) / "world").iterdir(), key=lambda p: p.stat().st_mtime)
            users = load_world(worlds[-1]).users
            ids = [str(u) for u in users.user_ids.tolist()]
            homes = list(zip(users.home_lat.tolist(), users.home_lon.tolist(), strict=True))
            return cls(ids, homes)
        rng = random.Random(11)
        ids = [f"user-{i:07d}" for i in range(n)]
        homes = [(CENTRE[0] + rng.gauss(0, 0.05), CENTRE[1] + rng.gauss(0, 0.08)) for _ in ids]
        return cls(ids, homes)

    def draw(self, rng: random.Random) -> tuple[str, tuple[float, float]]:
        (rank,) = rng.choices(range(len(self.ids)), weights=self._weights)
        row = self._order[rank]
        return self.ids[row], self.homes[row]


_population: Population | None = None


def population() -> Population:
    global _population  # one per locust process, loaded on first use (not at import)
    if _population is None:
        _population = Population.load(os.environ.get("RECSYS_ARTIFACTS"))
    return _population


class RecommendUser(User):
    """One app user: a visit is a home feed and a few refreshes, sometimes the offers tab."""

    wait_time = between(0.2, 1.5)

    def on_start(self) -> None:
        self._channel = grpc.insecure_channel(self.host or "127.0.0.1:50051")
        self._stub = recommender_pb2_grpc.RecommenderStub(self._channel)
        self._rng = random.Random()
        self._new_visit()

    def on_stop(self) -> None:
        self._channel.close()

    def _new_visit(self) -> None:
        rng = self._rng
        if rng.random() < NEW_USER_SHARE:
            self._user = f"new-{rng.getrandbits(40):x}"
            home = (CENTRE[0] + rng.gauss(0, 0.05), CENTRE[1] + rng.gauss(0, 0.08))
        else:
            self._user, home = population().draw(rng)
        away = rng.random() < 1 / 3
        self._location: tuple[float, float] | None = (
            (home[0] + rng.gauss(0, 0.03), home[1] + rng.gauss(0, 0.05)) if away else home
        )
        if rng.random() < 0.2:
            self._location = None  # location permission off: the server uses the home address
        self._refreshes_left = rng.randint(1, 5)

    def _call(self, name: str, surface: str) -> None:
        request = recommender_pb2.RecommendRequest(
            user_id=self._user, num_results=20, surface=surface, platform="android"
        )
        if self._location is not None:
            request.location.lat, request.location.lon = self._location
        start = time.perf_counter()
        exception: Exception | None = None
        size = 0
        try:
            response = self._stub.Recommend(
                request, timeout=TIMEOUT_SECONDS, metadata=user_metadata(self._user)
            )
            size = response.ByteSize()
        except grpc.RpcError as e:
            exception = e
        events.request.fire(  # type: ignore[no-untyped-call]
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - start) * 1000,
            response_length=size,
            exception=exception,
            context={"user": self._user},
        )

    @task(8)
    def home_feed(self) -> None:
        self._call("Recommend home", "home")
        self._refreshes_left -= 1
        if self._refreshes_left <= 0:
            self._new_visit()

    @task(2)
    def offers(self) -> None:
        self._call("Recommend offers", "offers")
