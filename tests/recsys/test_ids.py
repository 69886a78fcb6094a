"""One pattern for every name that becomes a path (recsys/ids.py): the artifact root, the
control store and the log files accept and refuse the same names."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recsys.artifacts import ArtifactError, check_id
from recsys.control.store import DOCUMENTS, StoreError, check_name
from recsys.ids import ID_PATTERN, is_id
from recsys.linelog.files import DEFAULT_PREFIX, RotatingFileWriter
from recsys.outcomes.sinks import OUTCOME_PREFIX
from recsys.ranking.routing import DEFAULT_MODEL_NAME

BAD = ["", "../x", "a/b", ".hidden", "x.y", "Upper", "-lead", "a" * 65, "a\n", "a b"]


def artifacts_accept(name: str) -> bool:
    try:
        check_id(name, "model name")
    except ArtifactError:
        return False
    return True


def store_accepts(name: str) -> bool:
    try:
        check_name(name)
    except StoreError:
        return False
    return True


def log_files_accept(name: str) -> bool:
    with tempfile.TemporaryDirectory() as directory:
        try:
            RotatingFileWriter(Path(directory) / "log", name).close()
        except ValueError:
            return False
        return True


@given(st.text(max_size=70) | st.from_regex(ID_PATTERN, fullmatch=True))
def test_the_artifact_root_the_store_and_the_log_files_accept_the_same_names(name: str) -> None:
    assert artifacts_accept(name) == store_accepts(name) == log_files_accept(name) == is_id(name)


@pytest.mark.parametrize("name", BAD)
def test_names_that_are_not_one_plain_path_component_are_refused_everywhere(name: str) -> None:
    assert not artifacts_accept(name)
    assert not store_accepts(name)
    assert not log_files_accept(name)


def test_the_names_the_code_uses_by_default_are_ids() -> None:
    for name in (*DOCUMENTS, DEFAULT_PREFIX, OUTCOME_PREFIX, DEFAULT_MODEL_NAME):
        assert is_id(name), name
