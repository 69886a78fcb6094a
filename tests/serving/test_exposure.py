from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from recsys.serving.exposure import (
    ExposureReadStats,
    ExposureSink,
    LineWriter,
    RotatingFileWriter,
    iter_exposure_lines,
)
from recsys.types import Exposure, Location, Recommendation, Request, ScoredItems
from tests.serving.test_record import FIELD_ORDER

LINE_KEYS = set(FIELD_ORDER)  # the exposure record's fields (tests/serving/test_record.py)


class Counts:
    def __init__(self) -> None:
        self.written = 0
        self.dropped = 0
        self.errors = 0

    def exposures_written(self, count: int) -> None:
        self.written += count

    def exposures_dropped(self, count: int) -> None:
        self.dropped += count

    def exposure_sink_errors(self, count: int) -> None:
        self.errors += count


class GatedWriter:
    """A slow sink: writes only once the test opens the gate."""

    def __init__(self, inner: LineWriter) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.entered = threading.Event()

    def write_lines(self, lines: list[str]) -> None:
        self.entered.set()
        self.gate.wait()
        self.inner.write_lines(lines)

    def close(self) -> None:
        self.inner.close()


class FailingWriter:
    """Fails its first ``failures`` batches (all of them by default), then writes to memory."""

    def __init__(self, failures: int = 1_000_000, *, close_fails: bool = False) -> None:
        self.calls = 0
        self.failures = failures
        self.close_fails = close_fails
        self.lines: list[str] = []

    def write_lines(self, lines: list[str]) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError("disk full")
        self.lines.extend(lines)

    def close(self) -> None:
        if self.close_fails:
            raise OSError("EIO on close")


def response(n: int) -> tuple[Request, Recommendation]:
    request = Request(
        request_id=f"r{n}",
        user_id=f"u{n}",
        num_results=3,
        location=Location(1.0, 2.0) if n % 2 else None,
        platform="ios",
    )
    recommendation = Recommendation(
        request_id=f"r{n}",
        items=ScoredItems(
            sku_ids=np.array([n, n + 1, n + 2], dtype=np.int64),
            restaurant_ids=np.array([1, 1, 2], dtype=np.int64),
            scores=np.array([0.9, 0.5, 0.25], dtype=np.float32),
        ),
        model_version="m1",
        index_version="i1",
        config_version="c1",
        exposures=(Exposure("feed", "exp", "treatment", bucket=42, forced=True),),
        degraded_reasons=("a", "b") if n == 0 else (),
    )
    return request, recommendation


def read_lines(directory: Path) -> list[dict[str, object]]:
    """Every record in the directory, oldest file first; fails on any line that did not parse."""
    stats = ExposureReadStats()
    records = [record for _, _, record in iter_exposure_lines(directory, stats)]
    assert stats.skipped == 0
    return records


def test_the_log_file_is_named_by_pid_start_and_sequence(tmp_path: Path) -> None:
    writer = RotatingFileWriter(tmp_path / "exposures", start=1_700_000_000.5)
    writer.write_lines(['{"n": 1}\n'])
    assert writer.active_path == (
        tmp_path / "exposures" / f"exposures-{os.getpid()}-1700000000500-0.jsonl"
    )
    writer.close()


async def test_every_record_is_written_as_one_json_line_and_flushed_on_close(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "exposures"
    counts = Counts()
    sink = ExposureSink(RotatingFileWriter(directory), queue_size=100, max_batch=7, observer=counts)
    sink.start()
    for n in range(25):
        assert sink.record(*response(n))
    await sink.close()
    lines = read_lines(directory)
    assert [line["request_id"] for line in lines] == [f"r{n}" for n in range(25)]
    assert counts.written == 25
    assert counts.dropped == 0
    first, second = lines[0], lines[1]
    assert set(first) == LINE_KEYS
    assert first["user_id"] == "u0"
    assert first["surface"] == "home"
    assert first["platform"] == "ios"
    assert first["has_location"] is False
    assert second["has_location"] is True
    assert first["model_version"] == "m1"
    assert first["index_version"] == "i1"
    assert first["config_version"] == "c1"
    assert first["exposures"] == [
        {"layer": "feed", "experiment": "exp", "arm": "treatment", "bucket": 42, "forced": True}
    ]
    assert first["degraded"] is True
    assert first["degraded_reason"] == "a; b"
    assert second["degraded"] is False
    assert first["sku_ids"] == [0, 1, 2]
    assert first["scores"] == [0.9, 0.5, 0.25]  # the shortest decimals of the float32 scores
    assert isinstance(first["ts"], float)


async def test_a_slow_sink_drops_and_counts_instead_of_blocking(tmp_path: Path) -> None:
    writer = GatedWriter(RotatingFileWriter(tmp_path))
    counts = Counts()
    sink = ExposureSink(writer, queue_size=3, max_batch=1, observer=counts)
    sink.start()
    assert sink.record(*response(0))
    await asyncio.to_thread(writer.entered.wait)  # record 0 is stuck in the writer thread
    accepted = [sink.record(*response(n)) for n in range(1, 11)]  # returns at once, never waits
    assert accepted == [True] * 3 + [False] * 7
    assert counts.dropped == 7
    writer.gate.set()
    await sink.close()
    assert counts.written == 4
    assert [line["request_id"] for line in read_lines(tmp_path)] == ["r0", "r1", "r2", "r3"]


async def test_a_failing_write_is_logged_counted_and_the_sink_keeps_going(
    caplog: pytest.LogCaptureFixture,
) -> None:
    counts = Counts()
    writer = FailingWriter()
    sink = ExposureSink(writer, queue_size=10, observer=counts)
    sink.start()
    sink.record(*response(0))
    sink.record(*response(1))
    await sink.close()
    assert counts.dropped == 2
    assert counts.written == 0
    assert writer.calls >= 1
    assert counts.errors == writer.calls
    assert "exposure log write failed" in caplog.text


async def test_an_outage_logs_one_traceback_counts_every_batch_and_recovery_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    counts = Counts()
    writer = FailingWriter(failures=6)
    sink = ExposureSink(writer, queue_size=100, max_batch=1, observer=counts)
    sink.start()
    for n in range(8):
        sink.record(*response(n))
    await sink.close()
    assert (counts.errors, counts.dropped, counts.written) == (6, 6, 2)
    assert [json.loads(line)["request_id"] for line in writer.lines] == ["r6", "r7"]
    tracebacks = [r for r in caplog.records if r.exc_info is not None]
    assert len(tracebacks) == 1  # one traceback for the outage, not one per batch
    assert "5 more times (5 records dropped); writes succeed again" in caplog.text


async def test_a_failing_close_is_logged_and_counted_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    counts = Counts()
    sink = ExposureSink(FailingWriter(failures=0, close_fails=True), observer=counts)
    sink.start()
    sink.record(*response(0))
    await sink.close()
    assert (counts.written, counts.errors) == (1, 1)
    assert "closing the writer failed" in caplog.text


async def test_records_after_close_are_dropped_and_counted(tmp_path: Path) -> None:
    counts = Counts()
    sink = ExposureSink(RotatingFileWriter(tmp_path), observer=counts)
    sink.start()
    await sink.close()
    assert sink.record(*response(0)) is False
    assert counts.dropped == 1


class BatchLog:
    """Keeps every batch it is given, in memory."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.closed = False

    def write_lines(self, lines: list[str]) -> None:
        self.batches.append(list(lines))

    def close(self) -> None:
        self.closed = True


def wait_written(counts: Counts, records: int, seconds: float = 10.0) -> None:
    """Poll until the sink's writer thread has counted ``records`` written; fail after
    ``seconds``. Run it with ``asyncio.to_thread``."""
    deadline = time.monotonic() + seconds
    while counts.written < records:
        assert time.monotonic() < deadline, "the writer thread did not get there in time"
        time.sleep(0.005)


async def test_records_put_within_the_gather_time_are_written_in_one_batch() -> None:
    writer = BatchLog()
    counts = Counts()
    sink = ExposureSink(writer, queue_size=1_000, observer=counts, gather_seconds=0.5)
    sink.start()
    for n in range(50):
        assert sink.record(*response(n))
    await asyncio.to_thread(wait_written, counts, 50)
    assert [len(batch) for batch in writer.batches] == [50]
    await sink.close()


async def test_a_record_after_the_writer_went_idle_wakes_it_without_a_close() -> None:
    writer = BatchLog()
    counts = Counts()
    sink = ExposureSink(writer, observer=counts, gather_seconds=0.001)
    sink.start()
    for n in range(3):  # each after the previous was written: the queue was empty each time
        assert sink.record(*response(n))
        await asyncio.to_thread(wait_written, counts, n + 1)
    assert [json.loads(line)["request_id"] for b in writer.batches for line in b] == [
        "r0",
        "r1",
        "r2",
    ]
    await sink.close()


async def test_nothing_queued_is_lost_when_the_sink_closes_while_the_writer_is_busy(
    tmp_path: Path,
) -> None:
    files = RotatingFileWriter(tmp_path)
    writer = GatedWriter(files)
    counts = Counts()
    sink = ExposureSink(writer, queue_size=10_000, max_batch=64, observer=counts)
    sink.start()
    assert sink.record(*response(0))
    await asyncio.to_thread(writer.entered.wait)  # the first batch is stuck in the writer
    for n in range(1, 1_000):  # queued behind it, more than one full batch
        assert sink.record(*response(n))
    closing = asyncio.ensure_future(sink.close())
    await asyncio.sleep(0.05)
    assert not closing.done()  # close waits for the writer
    assert sink.record(*response(1_000)) is False  # refused once the close began
    writer.gate.set()
    await closing
    assert [line["request_id"] for line in read_lines(tmp_path)] == [f"r{n}" for n in range(1_000)]
    assert (counts.written, counts.dropped) == (1_000, 1)
    assert files.active_path is None  # the writer was closed after the last batch
