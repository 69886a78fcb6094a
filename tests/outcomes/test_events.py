"""Outcome events: the line format, files (round trip, permissions) and the Redis Stream sink."""

from __future__ import annotations

import gzip
import stat
from pathlib import Path

import orjson
import pytest
import redis

from recsys.linelog.streams import StreamArchiver
from recsys.outcomes import (
    EVENT_KINDS,
    InvalidOutcome,
    OutcomeEvent,
    OutcomeLog,
    OutcomeReadStats,
    iter_outcomes,
    open_outcome_writer,
)
from recsys.outcomes.sinks import OUTCOME_PREFIX
from tests.control.redis_helpers import redis_prefix, redis_url

__all__ = ["redis_prefix", "redis_url"]

T0 = 1_700_000_000.0


def events(n: int, start: float = T0) -> list[OutcomeEvent]:
    kinds = EVENT_KINDS
    return [
        OutcomeEvent(f"req-{i // 3}", "user-0000007", 1000 + i, i % 20, kinds[i % 3], start + i)
        for i in range(n)
    ]


def test_an_event_is_one_json_line_in_the_contract_format() -> None:
    line = events(2)[1].to_json()
    assert line.endswith("\n")
    assert line.count("\n") == 1
    assert orjson.loads(line) == {
        "type": "outcome",
        "v": 1,
        "request_id": "req-0",
        "user_id": "user-0000007",
        "sku_id": 1001,
        "position": 1,
        "event": "click",
        "ts": T0 + 1,
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("type", "exposure"),
        ("v", 2),
        ("request_id", ""),
        ("sku_id", "7"),
        ("position", -1),
        ("event", "like"),
        ("ts", None),
    ],
)
def test_a_bad_field_is_named(field: str, value: object) -> None:
    record = orjson.loads(events(1)[0].to_json())
    record[field] = value
    with pytest.raises(InvalidOutcome, match=f"outcome {field}:"):
        OutcomeEvent.from_record(record)


def test_files_round_trip_through_rotation_with_private_permissions(tmp_path: Path) -> None:
    directory = tmp_path / "outcomes"
    log = OutcomeLog(open_outcome_writer(directory=directory, max_bytes=2_000))
    written = events(90)
    for lo in range(0, 90, 7):
        log.write(written[lo : lo + 7])
    log.close()
    assert log.written == 90
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = sorted(directory.iterdir())
    assert any(p.name.endswith(".jsonl.gz") for p in files)  # rotated and compressed
    assert all(p.name.startswith(f"{OUTCOME_PREFIX}-") for p in files)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    assert list(iter_outcomes(directory)) == written


def test_the_reader_filters_by_time_and_counts_what_it_skips(tmp_path: Path) -> None:
    directory = tmp_path / "outcomes"
    directory.mkdir(mode=0o700)
    good = events(10)
    with gzip.open(directory / "outcomes-1-1-0.jsonl.gz", "wt") as out:
        out.writelines(e.to_json() for e in good)
        out.write('{"type": "exposure"}\n')  # a JSON object, not an outcome
        out.write("not json\n")
    stats = OutcomeReadStats()
    kept = list(iter_outcomes(directory, since=T0 + 2, until=T0 + 5, stats=stats))
    assert kept == good[2:5]
    assert (stats.invalid, stats.malformed, stats.outside) == (1, 1, 7)


def test_the_redis_stream_sink_carries_events_that_archive_into_readable_files(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    stream = f"{redis_prefix}outcomes"
    log = OutcomeLog(open_outcome_writer(redis_url=redis_url, stream=stream))
    written = events(25)
    log.write(written[:10])
    log.write(written[10:])
    log.close()
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.xlen(stream) == 25
        archive = open_outcome_writer(directory=tmp_path / "outcomes")
        archiver = StreamArchiver(client, stream, "archive", "test", archive)
        archiver.create_group()
        assert archiver.drain().archived == 25
        archive.close()
    finally:
        client.close()
    assert list(iter_outcomes(tmp_path / "outcomes")) == written
