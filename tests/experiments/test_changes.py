"""Ramping and re-salting: nobody in an arm moves on ramp-up; everything else re-salts."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.experiments import changes
from recsys.experiments.assignment import Assigner, RequestAttributes, compile_config
from recsys.experiments.config import ConfigError
from tests.experiments.docs import single_experiment_doc, two_layer_doc

USERS = [f"user-{i}" for i in range(3000)]
ATTRS = RequestAttributes()


def arms_of(assigner: Assigner) -> dict[str, str]:
    """user -> arm of the one experiment, for users in it."""
    result = {}
    for u in USERS:
        for e in assigner.assign(u, ATTRS).exposures:
            result[u] = e.arm
    return result


def write(previous: dict[str, Any] | None, new: dict[str, Any]) -> changes.Prepared:
    return changes.prepare_write(previous, new)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 99),
    st.integers(1, 100),
    st.lists(st.floats(0.5, 5), min_size=1, max_size=4),
    st.lists(st.tuples(st.integers(0, 9999), st.integers(1, 800)), max_size=3),
)
def test_ramp_up_never_moves_a_user_already_in_an_arm(
    start: int, extra: int, weights: list[float], blocked: list[tuple[int, int]]
) -> None:
    doc = single_experiment_doc([], weights)
    # other running experiments in the layer hold some buckets; the ramp must go around them
    layer = doc["layers"][0]
    taken: set[int] = set()
    for i, (s, n) in enumerate(blocked):
        r = set(range(s, min(s + n, 10_000))) - taken
        if r:
            taken |= r
            layer["experiments"].append(
                {"name": f"other-{i}", "status": "running", "buckets": changes.to_ranges(r),
                 "arms": [{"name": "a", "weight": 1}]}
            )  # fmt: skip
    free = 10_000 - len(taken)
    low = min(start, free * 100 // 10_000)
    high = min(low + extra, free * 100 // 10_000)
    if low == 0:
        return
    before_doc = write(None, changes.ramp(doc, "exp", low)).doc
    after = write(before_doc, changes.ramp(before_doc, "exp", high))
    assert after.notes == ()  # no re-salt on ramp-up
    assert after.doc["layers"][0]["experiments"][0]["epoch"] == 0
    before_arms = arms_of(compile_config(before_doc))
    after_arms = arms_of(compile_config(after.doc))
    assert all(after_arms.get(u) == arm for u, arm in before_arms.items())
    share = changes.traffic_share(after.doc, "exp")
    assert share == pytest.approx(high / 100, abs=1e-4)


def test_ramp_down_reweight_and_restart_re_salt() -> None:
    base = write(None, single_experiment_doc([[0, 8000]], [1, 1])).doc

    down = write(base, changes.ramp(base, "exp", 40))
    assert down.notes == ("exp: ramped down; re-salted (epoch 0 -> 1)",)
    assert down.doc["layers"][0]["experiments"][0]["epoch"] == 1

    reweighted = single_experiment_doc([[0, 8000]], [3, 1])
    assert write(base, reweighted).notes == (
        "exp: arms or weights changed; re-salted (epoch 0 -> 1)",
    )

    stopped = write(base, changes.set_status(base, "exp", "stopped")).doc
    assert stopped["layers"][0]["experiments"][0]["epoch"] == 0
    restarted = write(stopped, changes.ramp(stopped, "exp", 80))
    assert restarted.notes == ("exp: restarted; re-salted (epoch 0 -> 1)",)


def test_re_salting_reshuffles_the_users_who_stay() -> None:
    base = write(None, single_experiment_doc([[0, 10_000]], [1, 1])).doc
    resalted = write(base, changes.ramp(base, "exp", 60)).doc
    before, after = arms_of(compile_config(base)), arms_of(compile_config(resalted))
    stayed = [u for u in after if u in before]
    same = sum(before[u] == after[u] for u in stayed) / len(stayed)
    assert 0.45 < same < 0.55  # independent of the old arm: half keep it by chance


def test_an_explicit_epoch_bump_is_kept_and_epochs_never_go_back() -> None:
    base = write(None, single_experiment_doc([[0, 8000]], [1, 1], epoch=4)).doc
    bumped = write(base, single_experiment_doc([[0, 4000]], [1, 1], epoch=9))
    assert bumped.notes == ()
    assert bumped.doc["layers"][0]["experiments"][0]["epoch"] == 9
    with pytest.raises(ConfigError, match=r"layers\[0\]\.experiments\[0\]\.epoch: expected >= 4"):
        write(base, single_experiment_doc([[0, 8000]], [1, 1], epoch=3))


def test_ramp_refuses_more_than_the_free_buckets() -> None:
    doc = two_layer_doc()
    with pytest.raises(ValueError, match="layer 'ranking' has 5000 free buckets"):
        changes.ramp(doc, "ranker-draft", 60)
    with pytest.raises(KeyError, match="no experiment named 'nope'"):
        changes.ramp(doc, "nope", 10)
    with pytest.raises(ValueError, match=r"expected 0\.\.100"):
        changes.ramp(doc, "ranker-v2", 101)


def test_ramp_to_zero_stops() -> None:
    doc = changes.ramp(two_layer_doc(), "restaurant-cap", 0)
    _, exp = changes.find_experiment(doc, "restaurant-cap")
    assert (exp["status"], exp["buckets"]) == ("stopped", [])


def test_to_ranges_round_trips() -> None:
    assert changes.to_ranges([5, 1, 2, 3, 9]) == [[1, 4], [5, 6], [9, 10]]
    assert changes.bucket_set([[1, 4], [9, 10]]) == {1, 2, 3, 9}
