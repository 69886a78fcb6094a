"""The routing of benchmarks/bench_models.py's served mode, checked with the serving assignment
code: the one-version document sends every arm to one version, the 24-version one spreads the
request stream evenly over 24 versions, and every request lands in an arm."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from benchmarks.bench_models import (
    ARMS_PER_SURFACE,
    MODEL_LAYER,
    SURFACES,
    cell_versions,
    experiments_document,
    served_requests,
    surface_of_users,
)
from recsys.experiments.assignment import RequestAttributes, compile_config
from recsys.types import Assignment

VERSIONS = [f"v{n:02d}" for n in range(len(SURFACES) * ARMS_PER_SURFACE)]
USERS = [f"user-{n}" for n in range(4_800)]


def assign(document: dict[str, object], user: str, surface: str) -> Assignment:
    assigner = compile_config(document, known_model_versions=VERSIONS)
    return assigner.assign(user, RequestAttributes(surface=surface, has_location=True))


def test_every_user_is_in_an_arm_on_exactly_one_surface() -> None:
    document = experiments_document(VERSIONS)
    assigner = compile_config(document, known_model_versions=VERSIONS)
    surfaces = surface_of_users(document, USERS)
    assert surfaces.keys() == set(USERS)
    for user in USERS[:300]:
        in_arm = [
            s
            for s in SURFACES
            if assigner.assign(user, RequestAttributes(surface=s, has_location=True)).exposures
        ]
        assert in_arm == [surfaces[user]]
    assert set(Counter(surfaces.values())) == set(SURFACES)


def test_the_one_version_document_routes_every_arm_to_that_version() -> None:
    document = experiments_document(["v07"])
    assert set(cell_versions(document).values()) == {"v07"}
    assert len(cell_versions(document)) == len(SURFACES) * ARMS_PER_SURFACE
    assigner = compile_config(document, known_model_versions=VERSIONS)
    arms: Counter[tuple[str, str]] = Counter()
    for user, surface in surface_of_users(document, USERS).items():
        assignment = assigner.assign(user, RequestAttributes(surface=surface, has_location=True))
        assert assignment.params.model_version == "v07"
        [exposure] = assignment.exposures
        assert exposure.layer == MODEL_LAYER
        arms[exposure.experiment, exposure.arm] += 1
    assert len(arms) == len(SURFACES) * ARMS_PER_SURFACE  # the same assignment work as 24


def test_the_24_version_document_spreads_the_users_evenly_over_24_versions() -> None:
    one, many = experiments_document(["v07"]), experiments_document(VERSIONS)
    assert sorted(cell_versions(many).values()) == VERSIONS
    surfaces = surface_of_users(many, USERS)
    assert surfaces == surface_of_users(one, USERS)
    assigner = compile_config(many, known_model_versions=VERSIONS)
    served: Counter[str] = Counter()
    for user, surface in surfaces.items():
        assignment = assigner.assign(user, RequestAttributes(surface=surface, has_location=True))
        [exposure] = assignment.exposures
        # A user is in the same cell under either document; only the version differs.
        [same] = assign(one, user, surface).exposures
        assert (same.experiment, same.arm, same.bucket) == (
            exposure.experiment,
            exposure.arm,
            exposure.bucket,
        )
        assert cell_versions(many)[f"{surface}/{exposure.arm}"] == assignment.params.model_version
        served[assignment.params.model_version] += 1
    assert sorted(served) == VERSIONS
    mean = len(USERS) / len(VERSIONS)
    assert 0.6 * mean < min(served.values()) <= max(served.values()) < 1.4 * mean


def test_the_served_requests_of_a_world_each_land_in_an_arm(artifacts_dir: Path) -> None:
    document = experiments_document(VERSIONS)
    requests = served_requests(artifacts_dir, document, 500, seed=3)
    assert len({r.user_id for r in requests}) > 300
    served: Counter[str] = Counter()
    for request in requests:
        assignment = assign(document, request.user_id, request.surface)
        assert request.HasField("location")
        assert [e.layer for e in assignment.exposures] == [MODEL_LAYER]
        served[assignment.params.model_version] += 1
    assert len(served) == len(VERSIONS)
