"""The promotion policy file: the built-in default, a full file, and refusals naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recsys.cli.main import main
from recsys.promotion.policy import OfflineCheck, Policy, PolicyError, load_policy, parse_policy

FULL = """
format = 1
revision = 4

[offline]
min_groups = 10
[[offline.check]]
metric = "ndcg@20"
slice = "overall"
max_drop_abs = 0.01
max_drop_rel = 0.02
[[offline.check]]
metric = "ctr@20"
slice = "district:*"
min = 0.05

[replay]
max_changed_share = 0.5
max_abs_score_shift = 2.0

[infra]
latency_budget_us = 50
memory_budget_mb = 8

[canary]
metric = "order_rate"
alpha = 0.01
ramp = [10, 50, 100]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_a_full_policy_file_is_read_with_its_revision_and_hash(tmp_path: Path) -> None:
    policy = load_policy(_write(tmp_path, FULL))
    assert policy.revision == 4
    assert len(policy.content_hash) == 64
    assert policy.offline.min_groups == 10
    assert policy.offline.checks[1] == OfflineCheck("ctr@20", "district:*", min=0.05)
    assert policy.replay.max_changed_share == 0.5
    assert policy.infra.latency_budget_us == 50.0
    assert policy.canary.ramp == (10.0, 50.0, 100.0)
    assert policy.canary.alpha == 0.01
    assert "revision 4" in policy.label()


def test_no_file_is_the_built_in_default() -> None:
    assert load_policy(None) == Policy()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ("max_drop_rel = 0.02", "max_drop_rel = 1.5"),
            "offline.check[0].max_drop_rel: expected a number in [0, 1), got 1.5",
        ),
        (
            ("max_drop_abs = 0.01", "max_drop_abs = -0.01"),
            "offline.check[0].max_drop_abs: expected a number in [0, 1], got -0.01",
        ),
        (
            ('metric = "ctr@20"', 'metric = "ctr@10"'),
            "offline.check[1].metric: expected one of ndcg@20, ctr@20, order_rate@20, got 'ctr@10'",
        ),
        (('slice = "district:*"', 'slice = "city:*"'), "offline.check[1].slice: expected overall"),
        (  # a TOML string ending in a newline
            ('slice = "district:*"', 'slice = "district:*\\n"'),
            "offline.check[1].slice: expected overall",
        ),
        (
            ("min_groups = 10", "min_groups = 0"),
            "offline.min_groups: expected an integer >= 1, got 0",
        ),
        (("alpha = 0.01", "alpha = 0"), "canary.alpha: expected a number in (0, 0.5], got 0"),
        (
            ("ramp = [10, 50, 100]", "ramp = [50, 10, 100]"),
            "canary.ramp: expected increasing percents",
        ),
        (("ramp = [10, 50, 100]", "ramp = [10, 50]"), "canary.ramp: expected increasing percents"),
        (
            ("latency_budget_us = 50", "latency_budget_us = 0"),
            "infra.latency_budget_us: expected a number in (0, inf), got 0",
        ),
        (
            ("max_changed_share = 0.5", "max_chnaged_share = 0.5"),
            "replay.max_chnaged_share: unknown field",
        ),
        (("format = 1", "format = 2"), "format: expected 1, got 2"),
        (
            ('metric = "order_rate"', 'metric = "revenue"'),
            "canary.metric: expected one of order_rate, ctr, got 'revenue'",
        ),
    ],
)
def test_a_bad_value_is_refused_naming_the_field(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    assert change[0] in FULL
    path = _write(tmp_path, FULL.replace(change[0], change[1], 1))
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert str(caught.value).startswith(f"{path}: {message}")
    assert "\n" not in str(caught.value)


def test_a_check_without_any_limit_is_refused() -> None:
    doc = {"format": 1, "offline": {"check": [{"metric": "ndcg@20", "slice": "overall"}]}}
    with pytest.raises(PolicyError, match=r"offline.check\[0\]: expected at least one of"):
        parse_policy(doc)


def test_the_cli_prints_one_line_and_exits_2_on_a_bad_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, FULL.replace("max_drop_rel = 0.02", "max_drop_rel = 2", 1))
    art = tmp_path / "art"
    art.mkdir()
    code = main(["models", "gates", "--artifacts", str(art), "--policy", str(path), "ranker", "v1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        f"recsys: {path}: offline.check[0].max_drop_rel: expected a number in [0, 1), got 2"
    ]


@given(
    champion=st.floats(0.0, 1.0),
    challenger=st.floats(0.0, 1.0),
    absolute=st.floats(0.0, 1.0),
    relative=st.floats(0.0, 0.99),
)
def test_a_check_fails_exactly_when_a_limit_is_broken(
    champion: float, challenger: float, absolute: float, relative: float
) -> None:
    check = OfflineCheck("ndcg@20", "overall", max_drop_abs=absolute, max_drop_rel=relative)
    drop = champion - challenger
    broken = drop > absolute or (champion > 0 and drop / champion > relative)
    assert bool(check.failures(champion, challenger)) == broken
    assert not check.failures(champion, champion)  # a model equal to the champion passes
