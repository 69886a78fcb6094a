"""`recsys experiments` through the real entry point, on the file store and on a real Redis."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from recsys.cli.main import main
from recsys.control.backends import open_store
from recsys.experiments.config import default_config
from tests.experiments.docs import two_layer_doc


@pytest.fixture(params=["file", "redis"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> list[str]:
    """CLI flags naming the control plane: the artifact root's file, or a Redis prefix."""
    flags = ["--artifacts", str(tmp_path)]
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        flags += ["--control", url, "--control-prefix", request.getfixturevalue("redis_prefix")]
    return flags


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["experiments", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def doc_file(tmp_path: Path, doc: dict[str, Any], name: str = "doc.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def stored(target: list[str]) -> dict[str, Any]:
    flags = dict(zip(target[::2], target[1::2], strict=True))
    store = open_store(
        flags.get("--control", ""),
        Path(flags["--artifacts"]),
        prefix=flags.get("--control-prefix", "recsys:"),
    )
    try:
        document = store.read("experiments")
        assert document is not None
        return document.body
    finally:
        store.close()


def test_apply_list_show_ramp_stop_kill_history(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, target: list[str]
) -> None:
    code, _, err = run(capsys, "list", *target)
    assert code == 2
    assert "no experiments document" in err

    path = doc_file(tmp_path, default_config())
    code, out, _ = run(capsys, "apply", path, *target, "--dry-run")
    assert code == 0
    assert "dry run: nothing written" in out
    code, _, err = run(capsys, "list", *target)
    assert code == 2

    code, out, _ = run(capsys, "apply", path, *target, "--author", "alice")
    assert (code, out.splitlines()[-1]) == (0, "experiments: version 0 -> 1 written by alice")
    code, out, _ = run(capsys, "list", *target)
    assert code == 0
    assert "retrieval-depth  running  100.0%" in out
    assert "restaurant-cap   running  30.0%" in out

    code, out, _ = run(capsys, "ramp", "restaurant-cap", "50", *target, "--author", "bob")
    assert code == 0
    assert "-              3000\n+              5000" in out
    code, out, _ = run(capsys, "ramp", "restaurant-cap", "20", *target, "--author", "bob")
    assert "note: restaurant-cap: ramped down; re-salted (epoch 0 -> 1)" in out
    code, out, _ = run(capsys, "show", "restaurant-cap", *target)
    shown = json.loads(out)
    assert (shown["layer"], shown["buckets"], shown["epoch"]) == ("arrange", [[0, 2000]], 1)

    assert run(capsys, "stop", "retrieval-depth", *target)[0] == 0
    assert run(capsys, "kill", "restaurant-cap", *target)[0] == 0
    assert run(capsys, "kill", "--all", *target)[0] == 0
    body = stored(target)
    statuses = [e["status"] for layer in body["layers"] for e in layer["experiments"]]
    assert (statuses, body["kill_switch"]) == (["stopped", "killed"], True)
    assert run(capsys, "kill", "--all", "--release", *target)[0] == 0
    assert stored(target)["kill_switch"] is False

    code, out, _ = run(capsys, "history", *target, "--limit", "3")
    assert code == 0
    assert out.startswith("v7  ")
    assert "~kill_switch: true -> false" in out
    assert "v5  " in out
    assert "v4  " not in out


def test_invalid_documents_and_changes_never_reach_the_store(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, target: list[str]
) -> None:
    assert run(capsys, "apply", doc_file(tmp_path, default_config()), *target)[0] == 0
    bad = default_config()
    bad["layers"][0]["experiments"][0]["arms"][1]["params"] = {"retrieval_k": 0}
    code, _, err = run(capsys, "apply", doc_file(tmp_path, bad, "bad.json"), *target)
    assert code == 2
    assert "layers[0].experiments[0].arms[1].params.retrieval_k: expected >= 1" in err
    code, _, err = run(capsys, "validate", doc_file(tmp_path, bad, "bad.json"), *target)
    assert code == 2
    assert "retrieval_k" in err
    code, out, _ = run(capsys, "validate", doc_file(tmp_path, two_layer_doc()), *target)
    assert code == 0
    assert "valid (3 layers, 4 experiments, 3 running)" in out
    code, _, err = run(capsys, "ramp", "retrieval-depth", "50", *target)
    assert code == 0
    code, _, err = run(capsys, "ramp", "nope", "50", *target)
    assert (code, "no experiment named 'nope'" in err) == (2, True)
    code, _, err = run(capsys, "apply", str(tmp_path / "missing.json"), *target)
    assert (code, "cannot read" in err) == (2, True)
    assert stored(target)["layers"][0]["experiments"][0]["buckets"] == [[0, 5000]]


def test_unknown_model_versions_are_rejected_when_the_artifact_root_has_models(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    version = tmp_path / "models" / "ranker" / "abc123"
    version.mkdir(parents=True)
    (version / "manifest.json").write_text("{}")
    doc = two_layer_doc()
    code, _, err = run(capsys, "validate", doc_file(tmp_path, doc), "--artifacts", str(tmp_path))
    assert code == 2
    assert "unknown model version 'm1'" in err
    for layer in doc["layers"]:
        layer["launch_defaults"].pop("model_version", None)
        for exp in layer["experiments"]:
            for arm in exp["arms"]:
                if "model_version" in arm["params"]:
                    arm["params"]["model_version"] = "abc123"
    code, _, _ = run(capsys, "validate", doc_file(tmp_path, doc), "--artifacts", str(tmp_path))
    assert code == 0


def test_assign_prints_every_layer_for_each_user_id(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    target: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert run(capsys, "apply", doc_file(tmp_path, two_layer_doc()), *target)[0] == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("user-1\n\nuser-2\nqa-tester\n"))
    code, out, _ = run(capsys, "assign", "--json", "-", *target)
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["user_id"] for line in lines] == ["user-1", "user-2", "qa-tester"]
    for line in lines:
        assert [x["layer"] for x in line["layers"]] == ["retrieval", "arrange", "ranking"]
        assert all(set(x) == {"layer", "bucket", "experiment", "arm"} for x in line["layers"])
    qa = {x["layer"]: x for x in lines[2]["layers"]}
    assert (qa["arrange"]["experiment"], qa["arrange"]["arm"]) == ("restaurant-cap", "cap-3")


def test_srm_from_counts_and_from_the_exposure_log(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    flags = ["--artifacts", str(tmp_path / "artifacts")]  # the log is beside the root
    assert run(capsys, "apply", doc_file(tmp_path, default_config()), *flags)[0] == 0
    counts = tmp_path / "counts.json"
    counts.write_text(json.dumps({"k200": 5000, "k400": 5600}))
    code, out, _ = run(capsys, "srm", "retrieval-depth", "--counts", str(counts), *flags)
    assert code == 1
    assert "MISMATCH (p < 0.001)" in out
    logs = tmp_path / "exposures"
    logs.mkdir()
    lines = [
        {"ts": 1.0, "request_id": str(i), "user_id": f"u{i}", "config_version": "1",
         "model_version": "m", "index_version": "i", "sku_ids": [],
         "exposures": [{"layer": "retrieval", "experiment": "retrieval-depth",
                        "arm": "k200" if i % 2 else "k400", "bucket": i, "forced": False}]}
        for i in range(1000)
    ]  # fmt: skip
    (logs / "exposures-1-1.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    code, out, _ = run(capsys, "srm", "retrieval-depth", *flags)
    assert code == 0
    assert "p-value 1: ok" in out
    assert "1 files in" in out
    code, _, err = run(capsys, "srm", "nope", *flags)
    assert (code, "no experiment named 'nope'" in err) == (2, True)


def test_a_concurrent_edit_is_a_conflict_not_a_lost_update(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, target: list[str]
) -> None:
    """Between the CLI's read and its write another op lands: the CLI must fail, not clobber."""
    assert run(capsys, "apply", doc_file(tmp_path, default_config()), *target)[0] == 0
    flags = dict(zip(target[::2], target[1::2], strict=True))
    store = open_store(
        flags.get("--control", ""),
        Path(flags["--artifacts"]),
        prefix=flags.get("--control-prefix", "recsys:"),
    )
    real_read = type(store).read
    interfered: list[bool] = []

    def read_then_someone_else_writes(self: Any, name: str) -> Any:
        document = real_read(self, name)
        if not interfered:  # once: the CLI's read; the other op's own write reads normally
            interfered.append(True)
            assert document is not None
            body = dict(document.body, kill_switch=True)
            store.write(name, body, expected_version=document.version, author="other-op")
        return document

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(type(store), "read", read_then_someone_else_writes)
    try:
        code, _, err = run(capsys, "ramp", "restaurant-cap", "50", *target)
    finally:
        monkeypatch.undo()
        store.close()
    assert code == 2
    assert "expected version 1 but the store has 2 (written by other-op" in err
    body = stored(target)
    assert body["kill_switch"] is True  # the other op's change survives
    assert body["layers"][1]["experiments"][0]["buckets"] == [[0, 3000]]
