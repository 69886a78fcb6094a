"""`recsys exposures archive` against the real Redis: a consumer group moves a stream of exposure
records into rotating files, acknowledging only what is on disk; `srm` reads the archive."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis

from recsys.cli.main import main
from recsys.experiments.config import default_config
from recsys.serving.exposure import (
    ExposureReadStats,
    RedisStreamWriter,
    exposure_log_files,
    iter_exposure_lines,
)
from recsys.serving.record import RECORD_VERSION, ExposureRecord
from recsys.serving.workers import free_port
from recsys.types import Exposure
from tests.serving.test_exposure import response

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


@pytest.fixture
def stream(redis_prefix: str, client: redis.Redis) -> Iterator[str]:
    """A stream key of this test's own, deleted afterwards."""
    key = f"{redis_prefix}exposures"
    yield key
    client.delete(key)


def publish(url: str, key: str, numbers: range, *, maxlen: int = 1_000_000) -> None:
    """Real exposure records through the server's Redis writer."""
    writer = RedisStreamWriter(url, key, maxlen)
    try:
        lines = []
        for n in numbers:
            request, recommendation = response(n)
            lines.append(ExposureRecord(1_700_000_000.0 + n, request, recommendation).to_json())
        writer.write_lines(lines)
    finally:
        writer.close()


def archive(
    capsys: pytest.CaptureFixture[str], url: str, key: str, out: Path, *flags: str
) -> tuple[int, str, str]:
    argv = ["exposures", "archive", "--from", url, "--stream", key, "--out", str(out)]
    code = main([*argv, "--group", "g", "--consumer", "c1", "--once", *flags])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def archived(out: Path) -> list[str]:
    stats = ExposureReadStats()
    ids = [str(record["request_id"]) for _, _, record in iter_exposure_lines(out, stats)]
    assert stats.skipped == 0
    return ids


def pending(client: redis.Redis, key: str, group: str = "g") -> int:
    summary: Any = client.xpending(key, group)
    return int(summary["pending"])


def test_once_archives_every_entry_and_acknowledges_it(
    capsys: pytest.CaptureFixture[str],
    redis_url: str,
    stream: str,
    client: redis.Redis,
    tmp_path: Path,
) -> None:
    publish(redis_url, stream, range(50))
    code, out, _ = archive(capsys, redis_url, stream, tmp_path / "archive")
    assert code == 0
    assert f"archived 50 records from {stream} (group g, consumer c1)" in out
    assert archived(tmp_path / "archive") == [f"r{n}" for n in range(50)]
    assert pending(client, stream) == 0
    records = [r for _, _, r in iter_exposure_lines(tmp_path / "archive")]
    assert records[0]["sku_ids"] == [0, 1, 2]  # the record as the server wrote it
    assert all(r["record"] == RECORD_VERSION for r in records)


def test_a_second_run_archives_only_what_came_since(
    capsys: pytest.CaptureFixture[str], redis_url: str, stream: str, tmp_path: Path
) -> None:
    out = tmp_path / "archive"
    publish(redis_url, stream, range(10))
    assert archive(capsys, redis_url, stream, out)[0] == 0
    publish(redis_url, stream, range(10, 25))
    code, text, _ = archive(capsys, redis_url, stream, out)
    assert (code, "archived 15 records" in text) == (0, True)
    assert archived(out) == [f"r{n}" for n in range(25)]  # two files, oldest first, no repeats
    assert len(exposure_log_files(out)) >= 2


def test_entries_read_and_never_acknowledged_are_archived_by_the_next_run(
    capsys: pytest.CaptureFixture[str],
    redis_url: str,
    stream: str,
    client: redis.Redis,
    tmp_path: Path,
) -> None:
    """An archiver that died between reading and acknowledging: the same consumer restarts."""
    client.xgroup_create(stream, "g", id="0", mkstream=True)
    publish(redis_url, stream, range(8))
    client.xreadgroup("g", "c1", {stream: ">"}, count=5)  # delivered to c1, never acknowledged
    assert pending(client, stream) == 5
    code, out, _ = archive(capsys, redis_url, stream, tmp_path / "archive")
    assert (code, "archived 8 records" in out) == (0, True)
    assert archived(tmp_path / "archive") == [f"r{n}" for n in range(8)]
    assert pending(client, stream) == 0


def test_entries_a_dead_consumer_left_are_claimed_once_idle_long_enough(
    capsys: pytest.CaptureFixture[str],
    redis_url: str,
    stream: str,
    client: redis.Redis,
    tmp_path: Path,
) -> None:
    client.xgroup_create(stream, "g", id="0", mkstream=True)
    publish(redis_url, stream, range(6))
    client.xreadgroup("g", "dead", {stream: ">"}, count=4)
    out = tmp_path / "archive"
    code, _, _ = archive(capsys, redis_url, stream, out, "--claim-idle-ms", "3600000")
    assert code == 0
    assert archived(out) == ["r4", "r5"]  # the dead consumer's entries are not idle enough
    assert pending(client, stream) == 4
    code, text, _ = archive(capsys, redis_url, stream, out, "--claim-idle-ms", "0")
    assert (code, "archived 4 records" in text) == (0, True)
    assert sorted(archived(out)) == sorted(f"r{n}" for n in range(6))
    assert pending(client, stream) == 0


def test_the_archive_rotates_and_compresses_its_files(
    capsys: pytest.CaptureFixture[str], redis_url: str, stream: str, tmp_path: Path
) -> None:
    publish(redis_url, stream, range(40))
    out = tmp_path / "archive"
    code, _, _ = archive(capsys, redis_url, stream, out, "--max-bytes", "4000", "--count", "7")
    assert code == 0
    files = exposure_log_files(out)
    assert len([p for p in files if p.name.endswith(".jsonl.gz")]) >= 3
    assert archived(out) == [f"r{n}" for n in range(40)]


def test_entries_trimmed_before_they_were_read_are_reported_lost(
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    redis_url: str,
    stream: str,
    client: redis.Redis,
    tmp_path: Path,
) -> None:
    out = tmp_path / "archive"
    assert archive(capsys, redis_url, stream, out)[0] == 0  # the group exists from here on
    publish(redis_url, stream, range(500), maxlen=10)  # MAXLEN ~10 trims unread entries
    kept = int(client.xlen(stream))
    assert kept < 500
    code, text, _ = archive(capsys, redis_url, stream, out)
    assert code == 0
    assert f"archived {kept} records" in text
    assert f"{500 - kept} entries LOST (trimmed before they were read)" in text
    assert f"{500 - kept} entries of {stream} were trimmed" in caplog.text
    assert archived(out) == [f"r{n}" for n in range(500 - kept, 500)]
    publish(redis_url, stream, range(500, 800), maxlen=10)  # again, past a cursor that has read
    again = int(client.xlen(stream))
    code, text, _ = archive(capsys, redis_url, stream, out)
    assert f"archived {again} records" in text
    assert f"{300 - again} entries LOST" in text
    code, text, _ = archive(capsys, redis_url, stream, out)  # nothing new: nothing lost again
    assert "archived 0 records" in text
    assert "LOST" not in text


def test_srm_reads_the_archive(
    capsys: pytest.CaptureFixture[str], redis_url: str, stream: str, tmp_path: Path
) -> None:
    """Rotated, compressed archive files count for the sample-ratio test like plain logs."""
    artifacts = tmp_path / "artifacts"
    config = tmp_path / "config.json"
    config.write_text(json.dumps(default_config()))
    assert main(["experiments", "apply", str(config), "--artifacts", str(artifacts)]) == 0
    writer = RedisStreamWriter(redis_url, stream, 1_000_000)
    try:
        for batch in range(10):
            lines = []
            for n in range(batch * 100, batch * 100 + 100):
                request, recommendation = response(n)
                arm = "k200" if n % 2 else "k400"
                exposures = (Exposure("retrieval", "retrieval-depth", arm, n % 10_000),)
                recommendation = replace(recommendation, exposures=exposures, config_version="1")
                lines.append(ExposureRecord(1.0, request, recommendation).to_json())
            writer.write_lines(lines)
    finally:
        writer.close()
    out = tmp_path / "archive"
    assert archive(capsys, redis_url, stream, out, "--max-bytes", "50000")[0] == 0
    assert any(p.name.endswith(".gz") for p in exposure_log_files(out))
    code = main(["experiments", "srm", "retrieval-depth", "--artifacts", str(artifacts),
                 "--exposures", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0, text
    assert f"{len(exposure_log_files(out))} files in {out}, 1000 lines" in text
    assert "p-value 1: ok" in text


def test_bad_flags_and_an_unreachable_redis_are_one_line_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "archive"
    code, _, err = archive(capsys, "http://example.com", "k", out)
    assert (code, err) == (
        2,
        "recsys: --from 'http://example.com': expected redis://HOST:PORT/DB\n",
    )
    code, _, err = archive(capsys, "redis://127.0.0.1:6379/0", "k", out, "--block-ms", "0")
    assert (code, err) == (2, "recsys: --block-ms is 0; expected >= 1\n")
    nobody = f"redis://127.0.0.1:{free_port('127.0.0.1')}/0"
    code, _, err = archive(capsys, nobody, "k", out)
    assert code == 2
    assert err.startswith(f"recsys: archive from {nobody}: ")
    assert err.count("\n") == 1


@pytest.mark.parametrize("prefix", ["../x", "a/b", ".hidden", ""])
def test_a_prefix_that_is_not_an_id_is_refused_naming_the_flag_and_nothing_is_written(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, prefix: str
) -> None:
    nobody = f"redis://127.0.0.1:{free_port('127.0.0.1')}/0"
    code, _, err = archive(capsys, nobody, "k", tmp_path / "archive", "--prefix", prefix)
    assert code == 2
    assert err == (
        f"recsys: --prefix {prefix!r}: expected a name of 1 to 64 lowercase letters, digits, "
        "'_' or '-', starting with a letter or digit\n"
    )
    assert list(tmp_path.iterdir()) == []  # neither --out nor anything beside it


def test_the_archiver_runs_until_sigterm_and_exits_0(
    redis_url: str, stream: str, client: redis.Redis, tmp_path: Path
) -> None:
    out = tmp_path / "archive"
    command = [
        sys.executable, "-m", "recsys.cli.main", "exposures", "archive", "--from", redis_url,
        "--stream", stream, "--group", "g", "--out", str(out), "--block-ms", "100",
    ]  # fmt: skip
    with subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as archiver:
        watchdog = threading.Timer(120, archiver.kill)
        watchdog.start()
        try:
            deadline = time.monotonic() + 60
            while not client.exists(stream):  # the archiver created its group (and the stream)
                assert archiver.poll() is None, archiver.communicate()
                assert time.monotonic() < deadline
                time.sleep(0.05)
            publish(redis_url, stream, range(30))
            while len(archived(out)) < 30:  # written while it runs, not only at the end
                assert archiver.poll() is None, archiver.communicate()
                assert time.monotonic() < deadline
                time.sleep(0.05)
            archiver.send_signal(signal.SIGTERM)
            stdout, stderr = archiver.communicate(timeout=60)
        finally:
            watchdog.cancel()
            archiver.kill()
    assert archiver.returncode == 0, stderr
    assert "archived 30 records" in stdout
    assert archived(out) == [f"r{n}" for n in range(30)]
    assert pending(client, stream) == 0
