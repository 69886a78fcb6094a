"""The routing table: parsing the document, canary traffic by user hash, arm pins."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.ranking.routing import (
    ModelRoute,
    RoutingError,
    RoutingTable,
    arm_pins,
    parse_routing,
)

FULL_DOC: dict[str, Any] = {
    "index": "idx-1",
    "models": {
        "ranker": {
            "production": "prod-1",
            "canary": {"version": "canary-1", "percent": 5.0},
            "previous": "prev-1",
        }
    },
}
KNOWN = {"ranker": {"prod-1", "canary-1", "prev-1"}}
USERS = [f"user-{n:07d}" for n in range(4_000)]


def _doc(route: Any, name: str = "ranker") -> dict[str, Any]:
    return {"index": "idx-1", "models": {name: route}}


def _table(percent: float, name: str = "ranker") -> RoutingTable:
    return RoutingTable(
        index_version="idx-1",
        models={name: ModelRoute("prod-1", "canary-1", percent)},
    )


# -- parse_routing ------------------------------------------------------------------------------


def test_a_full_document_parses_into_its_routes() -> None:
    table = parse_routing(FULL_DOC, known_versions=KNOWN)

    assert table.index_version == "idx-1"
    assert table.models == {
        "ranker": ModelRoute(
            production="prod-1", canary="canary-1", canary_percent=5.0, previous="prev-1"
        )
    }


def test_a_parsed_table_writes_back_the_document_it_was_parsed_from() -> None:
    table = parse_routing(FULL_DOC)

    assert table.to_document() == FULL_DOC
    assert parse_routing(table.to_document()) == table


def test_a_production_only_route_has_no_canary_and_no_previous() -> None:
    table = parse_routing(_doc({"production": "prod-1"}))

    assert table.models["ranker"] == ModelRoute("prod-1")
    assert table.to_document() == _doc({"production": "prod-1"})


def test_an_integer_canary_percent_is_read_as_a_float_and_100_is_allowed() -> None:
    table = parse_routing(_doc({"production": "p", "canary": {"version": "c", "percent": 100}}))

    percent = table.models["ranker"].canary_percent
    assert percent == 100.0
    assert isinstance(percent, float)


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"models": {"ranker": {"production": "p"}}}, "index"),
        ({"index": "", "models": {"ranker": {"production": "p"}}}, "index"),
        ({"index": 7, "models": {"ranker": {"production": "p"}}}, "index"),
        ({"index": "i"}, "models"),
        ({"index": "i", "models": {}}, "models"),
        ({"index": "i", "models": ["ranker"]}, "models"),
        (_doc("prod-1"), "models.ranker"),
        (_doc({}), "models.ranker.production"),
        (_doc({"production": ""}), "models.ranker.production"),
        (_doc({"production": "p", "canary": "c"}), "models.ranker.canary"),
        (_doc({"production": "p", "canary": {"percent": 5}}), "models.ranker.canary"),
        (_doc({"production": "p", "canary": {"version": "c"}}), "models.ranker.canary.percent"),
        (
            _doc({"production": "p", "canary": {"version": "c", "percent": 0}}),
            "models.ranker.canary.percent",
        ),
        (
            _doc({"production": "p", "canary": {"version": "c", "percent": 100.5}}),
            "models.ranker.canary.percent",
        ),
        (
            _doc({"production": "p", "canary": {"version": "c", "percent": True}}),
            "models.ranker.canary.percent",
        ),
        (
            _doc({"production": "p", "canary": {"version": "c", "percent": "5"}}),
            "models.ranker.canary.percent",
        ),
        (_doc({"production": "p", "previous": 3}), "models.ranker.previous"),
        (
            _doc({"production": "p", "canary": {"version": "p", "percent": 5}}),
            "models.ranker.canary",
        ),
        (_doc({}, name="other"), "models.other.production"),
    ],
)
def test_an_invalid_document_is_refused_with_a_message_naming_the_field(
    doc: dict[str, Any], field: str
) -> None:
    with pytest.raises(RoutingError, match=f"^{re.escape(field)}: "):
        parse_routing(doc)


def test_a_canary_equal_to_production_is_refused_naming_the_version() -> None:
    doc = _doc({"production": "p", "canary": {"version": "p", "percent": 5}})

    with pytest.raises(RoutingError, match="p is already the production version"):
        parse_routing(doc)


@pytest.mark.parametrize("missing", ["prod-1", "canary-1", "prev-1"])
def test_a_version_outside_known_versions_is_refused_naming_it(missing: str) -> None:
    known = {"ranker": KNOWN["ranker"] - {missing}}

    with pytest.raises(
        RoutingError, match=re.escape(f"models.ranker: unknown version(s) ['{missing}']")
    ):
        parse_routing(FULL_DOC, known_versions=known)


def test_a_model_name_absent_from_known_versions_has_every_version_unknown() -> None:
    with pytest.raises(
        RoutingError,
        match=re.escape("models.ranker: unknown version(s) ['canary-1', 'prev-1', 'prod-1']"),
    ):
        parse_routing(FULL_DOC, known_versions={"other": {"prod-1", "canary-1", "prev-1"}})


def test_without_known_versions_any_version_is_accepted() -> None:
    assert parse_routing(FULL_DOC, known_versions=None).models["ranker"].production == "prod-1"


def test_a_routing_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"^index: "):
        parse_routing({})


# -- versions ------------------------------------------------------------------------------------


def test_loaded_versions_include_the_previous_production_but_routed_versions_do_not() -> None:
    table = parse_routing(FULL_DOC)

    assert table.routed_versions() == {"ranker": {"prod-1", "canary-1"}}
    assert table.loaded_versions() == {"ranker": {"prod-1", "canary-1", "prev-1"}}


def test_a_production_only_route_loads_only_production() -> None:
    table = parse_routing(_doc({"production": "prod-1"}))

    assert table.loaded_versions() == {"ranker": {"prod-1"}}
    assert table.routed_versions() == {"ranker": {"prod-1"}}


# -- resolve -------------------------------------------------------------------------------------


def test_without_a_canary_every_user_gets_production() -> None:
    table = parse_routing(_doc({"production": "prod-1", "previous": "prev-1"}))

    assert {table.resolve("ranker", user) for user in USERS} == {"prod-1"}


def test_a_canary_at_100_percent_takes_every_user() -> None:
    table = _table(100.0)

    assert {table.resolve("ranker", user) for user in USERS} == {"canary-1"}


def test_a_five_percent_canary_takes_about_five_percent_of_users() -> None:
    table = parse_routing(FULL_DOC)

    on_canary = sum(table.resolve("ranker", user) == "canary-1" for user in USERS)

    assert 0.03 * len(USERS) < on_canary < 0.07 * len(USERS)


def test_a_pinned_version_wins_over_canary_and_production() -> None:
    table = _table(100.0)

    assert table.resolve("ranker", "user-0000001", pinned="arm-pin") == "arm-pin"


def test_a_pinned_version_is_served_even_for_a_model_name_without_a_route() -> None:
    assert _table(5.0).resolve("unrouted", "user-0000001", pinned="arm-pin") == "arm-pin"


def test_resolving_a_model_name_without_a_route_names_it() -> None:
    with pytest.raises(RoutingError, match=re.escape("models.unrouted: no route")):
        _table(5.0).resolve("unrouted", "user-0000001")


def test_the_canary_share_depends_on_the_model_name_not_only_the_user() -> None:
    first = {u for u in USERS if _table(50.0, "ranker").resolve("ranker", u) == "canary-1"}
    second = {u for u in USERS if _table(50.0, "other").resolve("other", u) == "canary-1"}

    assert first != second


def test_each_canary_version_of_a_model_draws_its_own_users() -> None:
    """Salted by the version: a group of users that happens to order less than the rest is not
    the canary of every version of the model (it made A/A canaries of one world look worse)."""

    def canary_users(version: str) -> set[str]:
        doc = _doc({"production": "prod-1", "canary": {"version": version, "percent": 50.0}})
        table = parse_routing(doc)
        return {u for u in USERS if table.resolve("ranker", u) == version}

    first, second = canary_users("canary-1"), canary_users("canary-2")
    overlap = len(first & second) / len(first)
    # Independent halves: about half of one canary's users are in the other's (sd ~1.1 points).
    assert 0.4 < overlap < 0.6
    assert canary_users("canary-1") == first  # and each is fixed while its canary runs


@settings(max_examples=50, deadline=None)
@given(
    percent=st.floats(min_value=0.0, max_value=100.0, exclude_min=True),
    prefix=st.text(max_size=12),
)
def test_the_canary_share_is_respected_within_tolerance_for_any_percent_and_users(
    percent: float, prefix: str
) -> None:
    table = _table(percent)
    users = [f"{prefix}{n}" for n in range(len(USERS))]

    first = [table.resolve("ranker", u) for u in users]
    again = [table.resolve("ranker", u) for u in users]

    assert first == again  # deterministic: a user stays where they are
    share = first.count("canary-1") / len(users)
    # 4,000 users: one standard deviation of the share is at most 0.8 percentage points.
    assert abs(share - percent / 100) < 0.04


@given(
    user=st.text(max_size=40),
    low=st.floats(min_value=0.0, max_value=100.0, exclude_min=True),
    high=st.floats(min_value=0.0, max_value=100.0, exclude_min=True),
)
def test_raising_the_canary_share_never_moves_a_canary_user_back_to_production(
    user: str, low: float, high: float
) -> None:
    low, high = sorted((low, high))

    if _table(low).resolve("ranker", user) == "canary-1":
        assert _table(high).resolve("ranker", user) == "canary-1"


# -- arm_pins ------------------------------------------------------------------------------------


def _arm(name: str, **params: Any) -> dict[str, Any]:
    return {"name": name, "params": params, "weight": 50}


def test_arm_pins_collects_versions_pinned_by_arms_with_their_experiment_and_arm() -> None:
    experiments = {
        "defaults": {"model_name": "ranker", "model_version": ""},
        "layers": [
            {
                "name": "ranking",
                "experiments": [
                    {
                        "name": "new-model",
                        "arms": [
                            _arm("control"),
                            _arm("treatment", model_version="v2"),
                            _arm("also", model_version="v2"),
                        ],
                    },
                    {
                        "name": "other-model",
                        "arms": [_arm("t", model_name="alt", model_version="a1")],
                    },
                ],
            }
        ],
    }

    assert arm_pins(experiments) == {
        "ranker": {"v2": {"new-model/treatment", "new-model/also"}},
        "alt": {"a1": {"other-model/t"}},
    }


def test_arm_pins_reads_the_defaults_and_a_layers_launch_defaults() -> None:
    experiments = {
        "defaults": {"model_version": "d1"},
        "layers": [
            {"name": "ranking", "launch_defaults": {"model_version": "l1"}, "experiments": []}
        ],
    }

    assert arm_pins(experiments) == {
        "ranker": {"d1": {"defaults"}, "l1": {"ranking/launch_defaults"}}
    }


def test_an_arm_without_a_model_name_pins_the_defaults_model_name() -> None:
    experiments = {
        "defaults": {"model_name": "main"},
        "layers": [
            {"name": "l", "experiments": [{"name": "e", "arms": [_arm("a", model_version="v")]}]}
        ],
    }

    assert arm_pins(experiments) == {"main": {"v": {"e/a"}}}


def test_an_arm_without_a_model_name_pins_its_layers_launch_model_name() -> None:
    """The assigner serves such an arm with the layer's launch_defaults model name; the pin
    must name the same model, or the pinned version would be loaded under the wrong name."""
    experiments = {
        "defaults": {"model_name": "main"},
        "layers": [
            {
                "name": "l",
                "launch_defaults": {"model_name": "alt"},
                "experiments": [{"name": "e", "arms": [_arm("a", model_version="v2")]}],
            }
        ],
    }

    assert arm_pins(experiments) == {"alt": {"v2": {"e/a"}}}


def test_the_built_experiments_document_without_model_versions_pins_nothing() -> None:
    experiments = {
        "defaults": {"model_name": "ranker", "model_version": "", "retrieval_k": 200},
        "layers": [
            {
                "name": "retrieval",
                "launch_defaults": {},
                "experiments": [{"name": "depth", "arms": [_arm("k400", retrieval_k=400)]}],
            }
        ],
    }

    assert arm_pins(experiments) == {}


@pytest.mark.parametrize(
    "experiments",
    [
        {},
        {"defaults": "nope", "layers": "nope"},
        {"layers": [3, "x", {"experiments": "nope"}]},
        {"layers": [{"experiments": [5, {"arms": ["a", {"params": "nope"}]}]}]},
        {"layers": [{"experiments": [{"arms": [{"params": {"model_version": 7}}]}]}]},
        {"layers": [{"experiments": [{"arms": [{"params": {"model_version": ""}}]}]}]},
    ],
)
def test_arm_pins_ignores_malformed_or_empty_entries(experiments: dict[str, Any]) -> None:
    assert arm_pins(experiments) == {}


def test_arm_pins_labels_unnamed_experiments_and_arms_with_a_question_mark() -> None:
    experiments = {"layers": [{"experiments": [{"arms": [{"params": {"model_version": "v"}}]}]}]}

    assert arm_pins(experiments) == {"ranker": {"v": {"?/?"}}}
