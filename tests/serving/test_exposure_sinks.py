"""The exposure sinks with real files, real processes and a real Redis: rotation, compression,
permissions, crash safety, the reader, the Redis Stream writer, and the server around them."""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.cli import serve as serve_cli
from recsys.cli.common import CliError
from recsys.serving.exposure import (
    ExposureReadStats,
    ExposureSink,
    RedisStreamWriter,
    RotatingFileWriter,
    exposure_log_files,
    iter_exposure_lines,
    open_exposure_writer,
)
from recsys.serving.metrics import ServingMetrics
from recsys.serving.pipeline import open_pipeline
from recsys.serving.server import RunningServer
from recsys.serving.workers import free_port
from recsys.settings import ServeSettings, default_exposure_dir
from recsys.v1 import recommender_pb2, recommender_pb2_grpc
from tests.control.redis_helpers import ThrowawayRedis, redis_prefix, redis_url, throwaway_redis
from tests.serving.test_exposure import response
from tests.serving.toy_pipeline import ToyOpener

__all__ = ["redis_prefix", "redis_url", "throwaway_redis"]

REPO = Path(__file__).resolve().parents[2]


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def line(n: int, pad: int = 0) -> str:
    return json.dumps({"request_id": f"r{n}", "pad": "x" * pad}) + "\n"


def request_ids(directory: Path, stats: ExposureReadStats | None = None) -> list[str]:
    return [str(record["request_id"]) for _, _, record in iter_exposure_lines(directory, stats)]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# -- files, permissions --------------------------------------------------------------------------


def test_files_are_created_0600_in_a_directory_created_0700(tmp_path: Path) -> None:
    directory = tmp_path / "deep" / "exposures"
    old_umask = os.umask(0)  # even with no umask at all: the modes are the writer's own
    try:
        writer = RotatingFileWriter(directory, max_bytes=100)
        writer.write_lines([line(0, pad=200)])  # past max_bytes: rotated and compressed
        writer.write_lines([line(1)])
    finally:
        os.umask(old_umask)
    writer.close()
    assert mode(directory) == 0o700
    files = sorted(p.name for p in directory.iterdir())
    assert len(files) == 2
    assert all(mode(directory / name) == 0o600 for name in files)
    assert request_ids(directory) == ["r0", "r1"]


def test_an_existing_directory_with_wider_permissions_is_tightened_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "exposures"
    directory.mkdir()
    os.chmod(directory, 0o755)
    with caplog.at_level(logging.WARNING):
        RotatingFileWriter(directory).close()
    assert mode(directory) == 0o700
    assert "had mode 0755; tightened to 0700" in caplog.text


def test_a_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "exposures").write_text("")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        RotatingFileWriter(tmp_path / "exposures")


# -- rotation ------------------------------------------------------------------------------------


def test_a_file_past_max_bytes_is_rotated_gzipped_and_read_back_with_the_active_one(
    tmp_path: Path,
) -> None:
    writer = RotatingFileWriter(tmp_path, max_bytes=1_000, start=1_700_000_000)
    for batch in range(10):  # 3 lines of about 110 bytes a batch: a file takes 3 batches
        writer.write_lines([line(batch * 3 + i, pad=80) for i in range(3)])
    active = writer.active_path
    writer.close()
    files = exposure_log_files(tmp_path)
    pid = os.getpid()
    assert [p.name for p in files] == [
        *(f"exposures-{pid}-1700000000000-{seq}.jsonl.gz" for seq in range(3)),
        f"exposures-{pid}-1700000000000-3.jsonl",
    ]
    assert files[-1] == active
    for compressed in files[:-1]:
        with gzip.open(compressed, "rt") as f:  # a real gzip file, of whole lines
            assert len(f.read().splitlines()) == 9
        assert mode(compressed) == 0o600
    assert not list(tmp_path.glob("*.part"))
    stats = ExposureReadStats()
    assert request_ids(tmp_path, stats) == [f"r{n}" for n in range(30)]
    assert (stats.files, stats.records, stats.skipped, stats.damaged_files) == (4, 30, 0, 0)


def test_a_file_open_past_max_age_is_rotated_at_the_next_batch(tmp_path: Path) -> None:
    clock = Clock()
    writer = RotatingFileWriter(tmp_path, max_age_seconds=60, clock=clock)
    writer.write_lines([line(0)])
    first = writer.active_path
    clock.now += 59.9
    writer.write_lines([line(1)])
    assert writer.active_path == first  # not yet
    clock.now += 0.1
    writer.write_lines([line(2)])  # the file is 60 s old: rotated before this batch
    assert writer.active_path != first
    assert first is not None
    assert not first.exists()
    assert Path(f"{first}.gz").exists()
    clock.now += 60
    writer.rotate_if_due()  # the archiver's idle check: no batch needed
    assert writer.active_path is None
    writer.close()
    assert [p.name.endswith(".gz") for p in exposure_log_files(tmp_path)] == [True, True]
    assert request_ids(tmp_path) == ["r0", "r1", "r2"]


# -- background compression (the serving process's writer) ---------------------------------------


def compressor_thread() -> threading.Thread:
    (thread,) = [t for t in threading.enumerate() if t.name == "log-compress" and t.is_alive()]
    return thread


def thread_nice(native_id: int | None) -> int:
    """The thread's niceness as the kernel keeps it (/proc/self/task/TID/stat, field 19)."""
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[16])


def test_the_serving_writer_compresses_rotated_files_in_a_thread_of_its_own_at_nice_19(
    tmp_path: Path,
) -> None:
    """A rotation used to gzip the closed file in the writer's thread, at the serving threads'
    priority: about a second of CPU a 64 MB file, which stalled a worker at every rotation."""
    settings = ServeSettings(exposure_dir=tmp_path, exposure_max_bytes=1_000)
    writer = open_exposure_writer(settings)
    for batch in range(10):  # 3 lines of about 110 bytes a batch: a file takes 3 batches
        writer.write_lines([line(batch * 3 + i, pad=80) for i in range(3)])
    assert isinstance(writer, RotatingFileWriter)
    assert writer.wait_compressed(timeout=30)
    thread = compressor_thread()
    if sys.platform.startswith("linux"):
        assert thread_nice(thread.native_id) == 19
        assert thread_nice(threading.get_native_id()) == 0  # the rest of the process is not
        comm = Path(f"/proc/self/task/{thread.native_id}/comm").read_text().strip()
        assert comm == "log-compress"
    suffixes = [p.name.split(".", 1)[1] for p in exposure_log_files(tmp_path)]
    assert suffixes == ["jsonl.gz", "jsonl.gz", "jsonl.gz", "jsonl"]
    writer.close()
    assert not thread.is_alive()
    assert not list(tmp_path.glob("*.part"))
    assert request_ids(tmp_path) == [f"r{n}" for n in range(30)]


@pytest.fixture
def compression_held(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Every compression waits for its writer's stop request (close()) before it runs, so that
    closed files are still waiting when the writer closes; yields the event set when the first
    one started waiting. The real compression runs afterwards and meets the stop request."""
    started = threading.Event()
    compress = RotatingFileWriter._compress

    def held_until_stopped(
        self: RotatingFileWriter, path: Path, stop: threading.Event | None = None
    ) -> Path:
        started.set()
        assert stop is not None
        stop.wait()
        return compress(self, path, stop)

    monkeypatch.setattr(RotatingFileWriter, "_compress", held_until_stopped)
    return started  # monkeypatch puts the real one back after the test


def test_closing_while_files_wait_for_compression_leaves_them_whole_and_plain_for_the_next_writer(
    tmp_path: Path, compression_held: threading.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() stops a compression under way within a chunk and lets every file go: nothing is
    lost, nothing is left half-written, and the next writer compresses them."""
    writer = RotatingFileWriter(
        tmp_path, max_bytes=1_000, pid=1, start=1.0, compress_in_background=True
    )
    for batch in range(10):  # three files rotated: one under way, two queued behind it
        writer.write_lines([line(batch * 3 + i, pad=80) for i in range(3)])
    assert compression_held.wait(timeout=30)
    assert not writer.wait_compressed(timeout=0.1)
    writer.close()
    assert [p.suffix for p in exposure_log_files(tmp_path)] == [".jsonl"] * 4
    assert not list(tmp_path.glob("*.part"))
    assert request_ids(tmp_path) == [f"r{n}" for n in range(30)]
    monkeypatch.undo()  # compressions run again
    assert RotatingFileWriter(tmp_path, pid=2, start=2.0).compress_closed_files() == 4
    assert [p.suffix for p in exposure_log_files(tmp_path)] == [".gz"] * 4
    assert request_ids(tmp_path) == [f"r{n}" for n in range(30)]


@pytest.mark.usefixtures("compression_held")
def test_a_growing_compression_backlog_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    writer = RotatingFileWriter(tmp_path, max_bytes=100, compress_in_background=True)
    with caplog.at_level(logging.WARNING):
        for n in range(6):  # each batch past max_bytes: six files rotated, none compressed
            writer.write_lines([line(n, pad=200)])
    writer.close()
    assert "closed files wait for compression" in caplog.text
    assert request_ids(tmp_path) == [f"r{n}" for n in range(6)]


# -- close, and the next writer in the directory --------------------------------------------------


def test_close_leaves_the_active_file_plain_and_the_next_writer_compresses_it(
    tmp_path: Path,
) -> None:
    first = RotatingFileWriter(tmp_path, pid=1, start=1.0)
    first.write_lines([line(0), line(1)])
    first.close()
    assert [p.suffix for p in exposure_log_files(tmp_path)] == [".jsonl"]
    second = RotatingFileWriter(tmp_path, pid=2, start=2.0)
    second.write_lines([line(2)])
    second.close()
    names = [p.name for p in exposure_log_files(tmp_path)]
    assert names == ["exposures-1-1000-0.jsonl.gz", "exposures-2-2000-0.jsonl"]
    assert request_ids(tmp_path) == ["r0", "r1", "r2"]


def test_a_live_writers_file_is_never_taken_by_another_writer(tmp_path: Path) -> None:
    """Workers of one server share the directory: each compresses only files nobody holds."""
    a = RotatingFileWriter(tmp_path, pid=1, start=1.0)
    a.write_lines([line(0)])
    b = RotatingFileWriter(tmp_path, pid=2, start=2.0)
    b.write_lines([line(1)])  # b's first batch looks for closed files: a's is held (flock)
    assert a.active_path is not None
    assert a.active_path.exists()
    a.write_lines([line(2)])
    a.close()
    b.close()
    assert RotatingFileWriter(tmp_path, pid=3, start=3.0).compress_closed_files() == 2
    assert [p.suffix for p in exposure_log_files(tmp_path)] == [".gz", ".gz"]
    assert sorted(request_ids(tmp_path)) == ["r0", "r1", "r2"]


def test_a_crash_between_compressing_and_removing_reads_once_and_is_cleaned_up(
    tmp_path: Path,
) -> None:
    plain = tmp_path / "exposures-7-7000-0.jsonl"
    plain.write_text(line(0) + line(1))
    Path(f"{plain}.gz").write_bytes(gzip.compress(plain.read_bytes()))  # renamed, not unlinked
    (tmp_path / "exposures-7-7000-1.jsonl.gz.part").write_bytes(b"\x1f\x8b half")  # ignored
    assert request_ids(tmp_path) == ["r0", "r1"]  # the complete compressed copy, once
    assert RotatingFileWriter(tmp_path).compress_closed_files() == 1
    assert not plain.exists()
    assert request_ids(tmp_path) == ["r0", "r1"]


# -- the reader ----------------------------------------------------------------------------------


def test_a_truncated_last_line_is_skipped_and_counted(tmp_path: Path) -> None:
    whole = "".join(line(n) for n in range(3))
    (tmp_path / "exposures-1-1-0.jsonl").write_text(whole + line(3)[:15])  # killed mid-line
    with gzip.open(tmp_path / "exposures-1-1-1.jsonl.gz", "wt") as f:
        f.write(line(4) + line(5)[:-4])
    stats = ExposureReadStats()
    assert request_ids(tmp_path, stats) == ["r0", "r1", "r2", "r4"]
    assert (stats.records, stats.truncated, stats.malformed, stats.skipped) == (4, 2, 0, 2)


def test_lines_that_are_not_records_are_counted_as_malformed(tmp_path: Path) -> None:
    (tmp_path / "exposures-1-1-0.jsonl").write_text(
        line(0) + "not json\n" + "[1, 2]\n" + "\n" + line(1)
    )
    stats = ExposureReadStats()
    found = [(path.name, number) for path, number, _ in iter_exposure_lines(tmp_path, stats)]
    assert found == [("exposures-1-1-0.jsonl", 1), ("exposures-1-1-0.jsonl", 5)]
    assert (stats.malformed, stats.truncated) == (2, 0)


def test_a_compressed_file_cut_short_yields_its_readable_lines_and_is_counted(
    tmp_path: Path,
) -> None:
    data = gzip.compress("".join(line(n, pad=50) for n in range(200)).encode())
    (tmp_path / "exposures-1-1-0.jsonl.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "exposures-1-1-1.jsonl").write_text(line(999))
    stats = ExposureReadStats()
    ids = request_ids(tmp_path, stats)
    assert ids[-1] == "r999"
    assert ids[:-1] == [f"r{n}" for n in range(len(ids) - 1)]
    assert stats.damaged_files == 1


def test_files_are_read_oldest_first(tmp_path: Path) -> None:
    names = {
        "exposures-9-3000-0.jsonl": 5,  # a later process
        "exposures-4-2000-10.jsonl.gz": 4,  # sequence numbers compare as numbers
        "exposures-4-2000-2.jsonl.gz": 3,
        "exposures-12-1000.jsonl": 1,  # before rotation: no sequence number
        "exposures-12-1000-0.jsonl": 2,
    }
    for name, n in names.items():
        if name.endswith(".gz"):
            (tmp_path / name).write_bytes(gzip.compress(line(n).encode()))
        else:
            (tmp_path / name).write_text(line(n))
    (tmp_path / "snapshots").mkdir()  # the snapshot manifests' directory is not a log
    assert request_ids(tmp_path) == ["r1", "r2", "r3", "r4", "r5"]


def test_a_missing_directory_reads_as_empty(tmp_path: Path) -> None:
    stats = ExposureReadStats()
    assert request_ids(tmp_path / "nope", stats) == []
    assert stats.files == 0


# -- crashes and full disks ----------------------------------------------------------------------

KILLED_WRITER = """
import asyncio, sys
from pathlib import Path
from recsys.serving.exposure import ExposureSink, RotatingFileWriter
from tests.serving.test_exposure import response

async def main() -> None:
    sink = ExposureSink(
        RotatingFileWriter(Path(sys.argv[1]), max_bytes=50_000), queue_size=100_000, max_batch=64
    )
    sink.start()
    n = 0
    while True:
        if sink.queue_depth < 1_000:  # never outrun the writer: nothing is dropped
            for _ in range(64):
                assert sink.record(*response(n))
                n += 1
        await asyncio.sleep(0.001)  # the writer thread writes meanwhile
        if n == 64 * 100:
            print("writing", flush=True)

asyncio.run(main())
"""


def test_a_killed_process_leaves_whole_lines_in_order(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        watchdog = threading.Timer(120, child.kill)
        watchdog.start()
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == "writing\n"
            while not list(tmp_path.glob("*.jsonl.gz")):  # at least one rotation happened
                assert child.poll() is None
                time.sleep(0.05)
            child.send_signal(signal.SIGKILL)
            child.wait()
        finally:
            watchdog.cancel()
            child.kill()
    stats = ExposureReadStats()
    ids = request_ids(tmp_path, stats)
    assert len(ids) > 64
    assert ids == [f"r{n}" for n in range(len(ids))]  # nothing lost before the last line
    assert stats.malformed == 0
    assert stats.truncated <= 1
    assert stats.damaged_files == 0


FULL_DISK = """
import errno, json, resource, signal, sys
from pathlib import Path
from recsys.serving.exposure import RotatingFileWriter

writer = RotatingFileWriter(Path(sys.argv[1]), max_bytes=1_000_000)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))  # files stop at 10 kB: EFBIG
results = []
for batch in range(8):
    size = 3 if batch < 6 else 12  # 1 kB lines, 3 kB batches, then two of 12 kB
    lines = [json.dumps({"request_id": f"r{batch * 100 + i}", "pad": "x" * 960}) + "\\n"
             for i in range(size)]
    try:
        writer.write_lines(lines)
        results.append("ok")
    except OSError as e:
        results.append(errno.errorcode[e.errno])
writer.close()
print(json.dumps(results))
"""


def test_a_batch_that_does_not_fit_is_cut_off_and_the_next_batch_starts_a_new_file(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(done.stdout) == ["ok", "ok", "ok", "EFBIG", "ok", "ok", "EFBIG", "EFBIG"]
    stats = ExposureReadStats()
    ids = request_ids(tmp_path, stats)
    assert ids == [f"r{b * 100 + i}" for b in (0, 1, 2, 4, 5) for i in range(3)]  # whole batches
    assert stats.skipped == 0
    # the last batch fits no file: the file it was given is removed, not left empty
    assert [p.suffix for p in exposure_log_files(tmp_path)] == [".gz", ".gz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        p.name for p in exposure_log_files(tmp_path)
    ]


# -- the Redis Stream writer ---------------------------------------------------------------------


@pytest.fixture
def stream(redis_url: str, redis_prefix: str) -> Iterator[str]:
    """A stream key of this test's own, deleted afterwards (with the prefix's other keys)."""
    key = f"{redis_prefix}exposures"
    yield key
    client = redis.Redis.from_url(redis_url)
    try:
        client.delete(key)
    finally:
        client.close()


def entries(url: str, key: str) -> list[dict[str, object]]:
    client = redis.Redis.from_url(url)
    try:
        stored: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(key)  # type: ignore[assignment]
        return [json.loads(fields[b"line"]) for _, fields in stored]
    finally:
        client.close()


def test_the_stream_writer_adds_one_entry_per_line_and_trims_near_maxlen(
    redis_url: str, stream: str
) -> None:
    writer = RedisStreamWriter(redis_url, stream, maxlen=1_000_000)
    writer.write_lines([line(n) for n in range(5)])
    assert [e["request_id"] for e in entries(redis_url, stream)] == [f"r{n}" for n in range(5)]
    trimmed = RedisStreamWriter(redis_url, stream, maxlen=100)
    for batch in range(20):
        trimmed.write_lines([line(batch * 100 + n) for n in range(100)])
    writer.close()
    trimmed.close()
    kept = entries(redis_url, stream)
    assert 100 <= len(kept) <= 300  # MAXLEN ~: whole nodes (100 entries by default) go
    assert kept[-1]["request_id"] == "r1999"


async def test_a_redis_outage_is_counted_as_sink_errors_and_drops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = ServingMetrics()
    nobody = f"redis://127.0.0.1:{free_port('127.0.0.1')}/0"  # nothing listens there
    sink = ExposureSink(
        RedisStreamWriter(nobody, "k", 100, timeout_seconds=1.0),
        max_batch=2,
        observer=metrics,
    )
    sink.start()
    for n in range(5):
        sink.record(*response(n))
    await sink.close()
    value = metrics.registry.get_sample_value
    assert value("recsys_exposure_sink_errors_total") == 3  # batches of 2, 2 and 1
    assert value("recsys_exposure_records_dropped_total") == 5
    assert value("recsys_exposure_records_written_total") == 0
    assert "exposure log write failed" in caplog.text


def test_a_restarted_redis_gets_the_next_batch_on_a_new_connection(
    throwaway_redis: ThrowawayRedis,
) -> None:
    writer = RedisStreamWriter(throwaway_redis.url, "exposures", maxlen=1_000)
    writer.write_lines([line(0)])
    throwaway_redis.stop()
    throwaway_redis.start()  # append-only file: the stream survives; the old socket does not
    writer.write_lines([line(1)])
    writer.close()
    assert [e["request_id"] for e in entries(throwaway_redis.url, "exposures")] == ["r0", "r1"]


# -- the server ----------------------------------------------------------------------------------


async def test_the_server_writes_to_a_redis_stream_when_told_to(
    tmp_path: Path, redis_url: str, stream: str
) -> None:
    settings = ServeSettings(
        artifacts=tmp_path,
        port=0,
        metrics_port=0,
        exposure_dir=tmp_path / "exposures",
        exposure_sink=redis_url,
        exposure_stream=stream,
    )
    running = await RunningServer.start(settings, ToyOpener())
    await running.wait_ready()
    ids = [f"req-{n}" for n in range(12)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        for n, request_id in enumerate(ids):
            request = recommender_pb2.RecommendRequest(user_id=f"u{n}", request_id=request_id)
            await stub.Recommend(request, timeout=30)
    await running.stop()
    assert [e["request_id"] for e in entries(redis_url, stream)] == ids
    assert running.metrics.registry.get_sample_value("recsys_exposure_records_written_total") == 12
    assert running.metrics.registry.get_sample_value("recsys_exposure_sink_errors_total") == 0
    assert request_ids(tmp_path / "exposures") == []  # nothing went to files


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file and directory under ``root`` with its mode, size and modification time."""
    found: dict[str, tuple[int, int, int]] = {}
    for directory, _dirs, files in os.walk(root):
        for name in (".", *files):
            path = Path(directory) / name
            info = path.stat()
            found[str(path.relative_to(root))] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return found


@pytest.fixture
def read_only_root(artifacts: Path) -> Iterator[Path]:
    os.chmod(artifacts, 0o555)
    try:
        yield artifacts
    finally:
        os.chmod(artifacts, 0o755)


async def test_a_read_only_artifact_root_serves_and_logs_to_the_exposure_dir_beside_it(
    read_only_root: Path,
) -> None:
    """The root is 0555 (which root ignores, so the test also checks nothing in it changed)."""
    before = tree(read_only_root)
    settings = ServeSettings(artifacts=read_only_root, port=0, metrics_port=0, drain_seconds=2)
    exposures = default_exposure_dir(read_only_root)
    assert exposures == read_only_root.parent / "exposures"
    running = await RunningServer.start(settings, open_pipeline)
    try:
        await running.wait_ready()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = recommender_pb2_grpc.RecommenderStub(channel)
            for n in range(3):
                request = recommender_pb2.RecommendRequest(
                    user_id=f"user-{n:07d}", request_id=f"ro-{n}"
                )
                assert len((await stub.Recommend(request, timeout=30)).items) == 20
    finally:
        await running.stop()
    assert request_ids(exposures) == ["ro-0", "ro-1", "ro-2"]
    assert mode(exposures) == 0o700
    assert list((exposures / "snapshots").glob("*.json"))  # the manifests replay needs
    assert tree(read_only_root) == before


def test_serve_settings_accept_a_read_only_artifact_root(read_only_root: Path) -> None:
    settings = serve_cli.serve_settings(parse(["serve", "--artifacts", str(read_only_root)]))
    assert settings.exposure_path == read_only_root.parent / "exposures"


def _wait_serving(target: str, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 180
    while True:
        assert server.poll() is None, log.read_text()
        with grpc.insecure_channel(target) as channel:
            try:
                status = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        assert time.monotonic() < deadline, "the server did not start serving"
        time.sleep(0.2)


def test_sigterm_writes_the_record_of_every_answered_request_to_disk(
    artifacts: Path, tmp_path: Path
) -> None:
    """Clients keep calling while the server gets SIGTERM: every OK answer is on disk, once."""
    exposures = tmp_path / "exposure-log"
    log = tmp_path / "serve.log"
    port = free_port("127.0.0.1")
    command = [
        sys.executable, "-m", "recsys.cli.main", "serve", "--artifacts", str(artifacts),
        "--port", str(port), "--metrics-port", "0", "--exposure-dir", str(exposures),
        "--drain-seconds", "30",
    ]  # fmt: skip
    with log.open("wb") as out:
        server = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=out)
    target = f"127.0.0.1:{port}"
    answered: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(worker: int) -> None:
        with grpc.insecure_channel(target) as channel:
            stub = recommender_pb2_grpc.RecommenderStub(channel)
            n = 0
            while not stop.is_set():
                request_id = f"w{worker}-{n}"
                n += 1
                request = recommender_pb2.RecommendRequest(
                    user_id=f"user-{n % 1000:07d}", request_id=request_id
                )
                try:
                    stub.Recommend(request, timeout=30)
                except grpc.RpcError:  # UNAVAILABLE while draining, or refused once stopped
                    if server.poll() is not None:
                        return
                    time.sleep(0.01)
                    continue
                with lock:
                    answered.append(request_id)

    try:
        _wait_serving(target, server, log)
        with ThreadPoolExecutor(4) as pool:
            clients = [pool.submit(client, w) for w in range(4)]
            deadline = time.monotonic() + 300
            while len(answered) < 200:  # calls are flowing on every client
                assert not any(c.done() for c in clients), [c.result() for c in clients]
                assert time.monotonic() < deadline, f"only {len(answered)} calls answered"
                time.sleep(0.01)
            server.send_signal(signal.SIGTERM)
            assert server.wait(timeout=120) == 0, log.read_text()
            stop.set()
            for c in clients:
                c.result()
    finally:
        stop.set()
        if server.poll() is None:
            server.kill()
            server.wait()
    stats = ExposureReadStats()
    on_disk = request_ids(exposures, stats)
    assert stats.skipped == 0
    assert len(on_disk) == len(answered)
    assert sorted(on_disk) == sorted(answered)
    assert "recsys stopped" in log.read_text()


# -- settings and flags --------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="recsys")
    serve_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_exposure_flags_become_settings(tmp_path: Path) -> None:
    argv = [
        "serve", "--artifacts", str(tmp_path), "--exposure-dir", str(tmp_path / "x"),
        "--exposure-sink", "redis://10.0.0.1:6379/2", "--exposure-stream", "s",
        "--exposure-stream-maxlen", "5000", "--exposure-max-bytes", "1048576",
        "--exposure-max-age-seconds", "60", "--exposure-queue-size", "99",
    ]  # fmt: skip
    settings = serve_cli.serve_settings(parse(argv))
    assert settings.exposure_path == tmp_path / "x"
    assert (settings.exposure_sink, settings.exposure_stream) == ("redis://10.0.0.1:6379/2", "s")
    assert settings.exposure_stream_maxlen == 5000
    assert settings.exposure_max_bytes == 1_048_576
    assert settings.exposure_max_age_seconds == 60.0
    assert settings.exposure_queue_size == 99


def test_exposure_defaults_come_from_recsys_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    defaults = serve_cli.serve_settings(parse(["serve", "--artifacts", str(tmp_path)]))
    assert defaults.exposure_path == tmp_path.parent / "exposures"  # beside the root
    assert (defaults.exposure_sink, defaults.exposure_stream) == ("", "recsys:exposures")
    assert defaults.exposure_max_bytes == 64 * 1024 * 1024
    assert defaults.exposure_max_age_seconds == 3600.0
    monkeypatch.setenv("RECSYS_EXPOSURE_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("RECSYS_EXPOSURE_MAX_BYTES", "4096")
    settings = serve_cli.serve_settings(parse(["serve", "--artifacts", str(tmp_path)]))
    assert settings.exposure_path == tmp_path / "env"
    assert settings.exposure_max_bytes == 4096


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--exposure-sink", "http://x"], "--exposure-sink 'http://x': expected empty"),
        (["--exposure-stream", ""], "--exposure-stream is empty"),
        (["--exposure-stream-maxlen", "0"], "--exposure-stream-maxlen is 0"),
        (["--exposure-max-bytes", "0"], "--exposure-max-bytes is 0"),
        (["--exposure-max-age-seconds", "0"], "--exposure-max-age-seconds is 0"),
        (["--exposure-queue-size", "0"], "--exposure-queue-size is 0"),
    ],
)
def test_bad_exposure_flags_are_one_line_errors(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    with pytest.raises(CliError, match=message) as raised:
        serve_cli.serve_settings(parse(["serve", "--artifacts", str(tmp_path), *flags]))
    assert "\n" not in str(raised.value)


def test_an_exposure_dir_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    args = parse(["serve", "--artifacts", str(tmp_path), "--exposure-dir", str(tmp_path / "file")])
    with pytest.raises(CliError, match=r"--exposure-dir .*file: not a directory"):
        serve_cli.serve_settings(args)
