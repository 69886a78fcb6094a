"""The DocumentStore contract, run against both backends (a file directory and a real Redis)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from recsys.control.backends import open_store
from recsys.control.store import (
    Document,
    DocumentStore,
    StoreError,
    VersionConflict,
    summarize_changes,
)


@pytest.fixture(params=["file", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DocumentStore]:
    if request.param == "file":
        opened = open_store("", tmp_path)
    else:
        url = request.getfixturevalue("redis_url")
        opened = open_store(url, tmp_path, prefix=request.getfixturevalue("redis_prefix"))
    yield opened
    opened.close()


def test_create_read_and_update(store: DocumentStore) -> None:
    assert store.read("experiments") is None
    assert store.read_version("experiments") == 0
    first = store.write("experiments", {"a": 1}, expected_version=0, author="alice")
    assert (first.version, first.body, first.author) == (1, {"a": 1}, "alice")
    second = store.write("experiments", {"a": 2}, expected_version=1, author="bob")
    assert second.version == 2
    read = store.read("experiments")
    assert isinstance(read, Document)
    assert (read.version, read.body, read.author) == (2, {"a": 2}, "bob")
    assert read.updated_at >= first.updated_at
    assert store.read_version("experiments") == 2


def test_documents_are_independent_by_name(store: DocumentStore) -> None:
    store.write("experiments", {"x": 1}, expected_version=0, author="a")
    store.write("routing", {"y": 1}, expected_version=0, author="a")
    assert store.read_version("experiments") == store.read_version("routing") == 1
    assert store.read("availability") is None


def test_stale_expected_version_is_a_conflict_naming_the_winner(store: DocumentStore) -> None:
    store.write("experiments", {"v": 1}, expected_version=0, author="alice")
    store.write("experiments", {"v": 2}, expected_version=1, author="bob")
    with pytest.raises(VersionConflict) as info:
        store.write("experiments", {"v": "lost?"}, expected_version=1, author="carol")
    message = str(info.value)
    assert "expected version 1 but the store has 2" in message
    assert "written by bob" in message
    assert info.value.actual == 2
    stored = store.read("experiments")
    assert stored is not None
    assert stored.body == {"v": 2}


def test_creating_an_existing_document_conflicts(store: DocumentStore) -> None:
    store.write("experiments", {"v": 1}, expected_version=0, author="alice")
    with pytest.raises(VersionConflict, match="expected version 0 but the store has 1"):
        store.write("experiments", {"v": 9}, expected_version=0, author="bob")


def test_caller_cannot_mutate_the_stored_body(store: DocumentStore) -> None:
    body = {"layers": [1, 2]}
    store.write("experiments", body, expected_version=0, author="a")
    body["layers"].append(3)
    stored = store.read("experiments")
    assert stored is not None
    assert stored.body == {"layers": [1, 2]}


def test_bad_input_is_rejected_clearly(store: DocumentStore) -> None:
    with pytest.raises(StoreError, match="document name"):
        store.write("../etc/passwd", {}, expected_version=0, author="a")
    with pytest.raises(StoreError, match="not valid JSON"):
        store.write("experiments", {"x": float("nan")}, expected_version=0, author="a")
    with pytest.raises(StoreError, match="author"):
        store.write("experiments", {"x": 1}, expected_version=0, author="")
    assert store.read("experiments") is None


def test_history_records_who_when_and_what(store: DocumentStore) -> None:
    store.write("experiments", {"layers": [{"name": "a", "k": 1}]}, expected_version=0, author="al")
    store.write(
        "experiments",
        {"layers": [{"name": "a", "k": 2}, {"name": "b"}]},
        expected_version=1,
        author="bo",
    )
    entries = store.history("experiments")
    assert [(e.version, e.author) for e in entries] == [(2, "bo"), (1, "al")]
    assert entries[0].changes == ("~layers[a].k: 1 -> 2", "+layers[b]")
    assert entries[0].updated_at >= entries[1].updated_at
    assert [e.version for e in store.history("experiments", limit=1)] == [2]
    assert store.history("routing") == []


def test_two_writers_racing_one_wins_nothing_is_lost(store: DocumentStore) -> None:
    """Writers that retry on conflict: every increment lands exactly once."""
    store.write("experiments", {"count": 0, "by": []}, expected_version=0, author="init")
    per_writer = 15
    conflicts: list[int] = []

    def writer(name: str) -> None:
        done = 0
        while done < per_writer:
            current = store.read("experiments")
            assert current is not None
            body = {"count": current.body["count"] + 1, "by": [*current.body["by"], name]}
            try:
                store.write("experiments", body, expected_version=current.version, author=name)
                done += 1
            except VersionConflict:
                conflicts.append(1)

    threads = [threading.Thread(target=writer, args=(f"w{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = store.read("experiments")
    assert final is not None
    assert final.body["count"] == 3 * per_writer
    assert final.version == 1 + 3 * per_writer
    assert sorted(final.body["by"]) == sorted(f"w{i}" for i in range(3) for _ in range(per_writer))
    assert len(store.history("experiments", limit=1000)) == 1 + 3 * per_writer


def test_summarize_changes_names_paths() -> None:
    before = {"a": 1, "b": {"c": [1, 2]}, "gone": True}
    after = {"a": 2, "b": {"c": [1, 2, 3]}, "new": "x"}
    assert summarize_changes(before, after) == (
        "~a: 1 -> 2",
        "~b.c: [1, 2] -> [1, 2, 3]",
        "-gone",
        '+new: "x"',
    )
    many = summarize_changes({str(i): i for i in range(80)}, {str(i): -i for i in range(80)})
    assert len(many) == 51
    assert many[-1].startswith("... and ")


def test_open_store_rejects_unknown_urls(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="expected '' or 'file:'"):
        open_store("postgres://x", tmp_path)
