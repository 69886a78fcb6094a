"""`recsys availability`: real file store and real Redis, validated against the built world."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.cli.availability import change_document
from recsys.cli.main import main
from recsys.control.backends import open_store
from recsys.retrieval.availability import Availability
from recsys.world import load_world
from tests.control.redis_helpers import redis_prefix, redis_url

__all__ = ["redis_prefix", "redis_url"]


def _body(artifacts: Path, url: str = "", prefix: str = "recsys:") -> dict[str, object]:
    store = open_store(url, artifacts, prefix=prefix)
    try:
        document = store.read("availability")
    finally:
        store.close()
    assert document is not None
    return document.body


def test_off_then_on_edits_the_document_with_the_expected_version(
    artifacts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["availability", "off", "--artifacts", str(artifacts), "--sku", "12", "--sku", "5",
         "--restaurant", "3", "--author", "ops"]
    )  # fmt: skip
    assert code == 0
    assert "version 1 -> 2 written by ops" in capsys.readouterr().out
    assert _body(artifacts) == {"skus_off": [5, 12], "restaurants_off": [3]}

    assert main(["availability", "on", "--artifacts", str(artifacts), "--sku", "12"]) == 0
    assert _body(artifacts) == {"skus_off": [5], "restaurants_off": [3]}

    assert main(["availability", "show", "--artifacts", str(artifacts)]) == 0
    assert "1 SKUs and 1 restaurants off" in capsys.readouterr().out


def test_an_out_of_range_id_is_rejected_and_nothing_is_written(
    artifacts: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _body(artifacts)
    code = main(["availability", "off", "--artifacts", str(artifacts), "--sku", "10000000"])
    assert code == 2
    err = capsys.readouterr().err
    assert "skus_off" in err
    assert "10000000" in err
    assert "out of range" in err
    assert _body(artifacts) == before


def test_a_change_needs_a_target(artifacts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["availability", "off", "--artifacts", str(artifacts)]) == 2
    assert "--sku or --restaurant" in capsys.readouterr().err


def test_dry_run_writes_nothing(artifacts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _body(artifacts)
    code = main(["availability", "off", "--artifacts", str(artifacts), "--sku", "1", "--dry-run"])
    assert code == 0
    assert "dry run" in capsys.readouterr().out
    assert _body(artifacts) == before


def test_the_written_document_compiles_to_a_snapshot_without_those_items(
    artifacts: Path,
) -> None:
    main(["availability", "off", "--artifacts", str(artifacts), "--restaurant", "0", "--sku", "7"])
    world = load_world(next((artifacts / "world").iterdir()))
    snapshot = Availability.from_document(world.catalogue, _body(artifacts))
    assert not snapshot.item_mask[7]
    assert not snapshot.item_mask[world.catalogue.item_restaurant == 0].any()


def test_redis_control_plane(artifacts: Path, redis_url: str, redis_prefix: str) -> None:
    common = ["--artifacts", str(artifacts), "--control", redis_url, "--control-prefix",
              redis_prefix]  # fmt: skip
    assert main(["availability", "off", *common, "--sku", "9"]) == 0
    assert main(["availability", "off", *common, "--restaurant", "2"]) == 0
    store = open_store(redis_url, artifacts, prefix=redis_prefix)
    try:
        document = store.read("availability")
    finally:
        store.close()
    assert document is not None
    assert document.version == 2
    assert document.body == {"skus_off": [9], "restaurants_off": [2]}


def test_change_document_is_a_set_edit() -> None:
    body = {"skus_off": [3, 1], "restaurants_off": []}
    assert change_document(body, off=True, skus=[1, 2], restaurants=[4]) == {
        "skus_off": [1, 2, 3],
        "restaurants_off": [4],
    }
    assert change_document(body, off=False, skus=[3, 99], restaurants=[]) == {
        "skus_off": [1],
        "restaurants_off": [],
    }
    assert change_document(None, off=True, skus=[], restaurants=[0]) == {
        "skus_off": [],
        "restaurants_off": [0],
    }
