"""The exposure log's write path: CPU per record, per sink, through a real ExposureSink.

Sinks: ``file-plain``, a RotatingFileWriter whose files never rotate (encoding, hand-off and
write only); ``file``, one with the served defaults (64 MiB files gzip-compressed at rotation,
and the file still open at the stop compressed by the next writer, timed too: every record ends
up compressed, the steady-state cost of a record on disk); ``redis``, a RedisStreamWriter to
``--redis`` on a stream key of its own, deleted afterwards (the Redis server's own CPU is not
counted). ``--records`` records go through ``ExposureSink.record`` on an event loop in bursts
of ``--burst`` (one ``asyncio.sleep(0)`` between bursts, so the writer thread takes batches
while records keep coming), then ``close`` writes what is still queued. The figure is the
whole process's CPU time (``time.process_time``: the loop thread's ``record``, the writer
thread's batching, encoding, write and compression, the Redis client) divided by
the records; wall time is printed too. ``encode`` is ``ExposureRecord.to_json`` alone, and
``encode-before`` the first wave's smaller record encoded the way it was (json over tolist), on
the same records in the same run.

A record: 20 served items, a 52-value float64 feature row (random: the longest decimals, so an
upper bound on the line), two experiment exposures, a location; ``--candidates-share`` of them
(default 1%, the server's default) also carry 200 ranked candidates. Each sink runs
``--repeats`` times; the best and the median are printed, one JSON line per sink.

    .venv/bin/python -m benchmarks.bench_exposure [--records 50000] [--redis redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis

from recsys.serving.exposure import (
    ExposureReadStats,
    ExposureSink,
    LineWriter,
    RedisStreamWriter,
    RotatingFileWriter,
    iter_exposure_lines,
)
from recsys.serving.metrics import ServingMetrics
from recsys.serving.record import ExposureRecord
from recsys.settings import ServeSettings
from recsys.types import Exposure, Location, Recommendation, Request, ScoredItems

POOL = 1_000


def realistic_records(
    candidates_share: float, seed: int = 5
) -> list[tuple[Request, Recommendation]]:
    """``POOL`` distinct (request, recommendation) pairs shaped like the served ones."""
    rng = np.random.default_rng(seed)
    pairs = []
    for n in range(POOL):
        sku_ids = rng.choice(100_000, size=20, replace=False).astype(np.int64)
        items = ScoredItems(
            sku_ids=sku_ids,
            restaurant_ids=(sku_ids // 20).astype(np.int64),
            scores=np.sort(rng.random(20).astype(np.float32))[::-1].copy(),
        )
        candidates = None
        if rng.random() < candidates_share:
            ranked = rng.choice(100_000, size=200, replace=False).astype(np.int64)
            candidates = ScoredItems(
                sku_ids=ranked,
                restaurant_ids=(ranked // 20).astype(np.int64),
                scores=rng.random(200).astype(np.float32),
            )
        request_id = uuid.UUID(int=int(rng.integers(0, 2**63))).hex
        request = Request(
            request_id=request_id,
            user_id=f"user-{int(rng.integers(0, 10_000)):07d}",
            num_results=20,
            location=Location(52.5 + float(rng.random()) / 10, 13.4 + float(rng.random()) / 10),
            platform="ios" if n % 2 else "android",
            hour=int(rng.integers(0, 24)),
        )
        recommendation = Recommendation(
            request_id=request_id,
            items=items,
            model_version="ranker-4bde5720a7a5",
            index_version="index-6341b98bd127",
            config_version="42",
            exposures=(
                Exposure("retrieval", "retrieval-depth", "k400", int(rng.integers(0, 10_000))),
                Exposure("arrange", "restaurant-cap", "cap-3", int(rng.integers(0, 10_000))),
            ),
            snapshot_id="0123456789abcdef",
            user_features=rng.random(52),
            candidates=candidates,
        )
        pairs.append((request, recommendation))
    return pairs


class CountingWriter:
    """Counts the batches a writer gets (the mean batch size says how the hand-off went)."""

    def __init__(self, inner: LineWriter) -> None:
        self.inner = inner
        self.batches = 0
        self.bytes = 0

    def write_lines(self, lines: list[str]) -> None:
        self.batches += 1
        self.bytes += sum(len(line) for line in lines)
        self.inner.write_lines(lines)

    def close(self) -> None:
        self.inner.close()


async def through_sink(
    writer: LineWriter, pairs: list[tuple[Request, Recommendation]], records: int, burst: int
) -> dict[str, float]:
    metrics = ServingMetrics()
    counting = CountingWriter(writer)
    sink = ExposureSink(counting, queue_size=records + 1, observer=metrics)  # no drops
    sink.start()
    cpu, wall = time.process_time(), time.perf_counter()
    for start in range(0, records, burst):
        for n in range(start, min(start + burst, records)):
            sink.record(*pairs[n % POOL])
        await asyncio.sleep(0)
    await sink.close()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    value = metrics.registry.get_sample_value
    return {
        "cpu_us": cpu / records * 1e6,
        "wall_us": wall / records * 1e6,
        "written": value("recsys_exposure_records_written_total") or 0.0,
        "dropped": value("recsys_exposure_records_dropped_total") or 0.0,
        "errors": value("recsys_exposure_sink_errors_total") or 0.0,
        "mean_batch": records / max(counting.batches, 1),
        "bytes_per_record": counting.bytes / records,
    }


def encode_only(pairs: list[tuple[Request, Recommendation]], records: int) -> dict[str, float]:
    cpu = time.process_time()
    for n in range(records):
        ExposureRecord(1.0, *pairs[n % POOL]).to_json()
    return {"cpu_us": (time.process_time() - cpu) / records * 1e6}


def encode_before(line: tuple[Request, Recommendation]) -> str:
    """The first wave's record (no snapshot id, request fields, feature row or candidates;
    scores rounded to 6 decimals), encoded as it was: json.dumps over tolist(). The baseline of
    ``encode-before``."""
    request, rec = line
    return (
        json.dumps(
            {
                "ts": round(1.0, 6),
                "request_id": rec.request_id,
                "user_id": request.user_id,
                "surface": request.surface,
                "platform": request.platform,
                "has_location": request.location is not None,
                "model_version": rec.model_version,
                "index_version": rec.index_version,
                "config_version": rec.config_version,
                "exposures": [
                    {
                        "layer": e.layer,
                        "experiment": e.experiment,
                        "arm": e.arm,
                        "bucket": e.bucket,
                        "forced": e.forced,
                    }
                    for e in rec.exposures
                ],
                "degraded": rec.degraded,
                "degraded_reason": rec.degraded_reason,
                "sku_ids": rec.items.sku_ids.tolist(),
                "scores": np.round(rec.items.scores.astype(np.float64), 6).tolist(),
            },
            separators=(",", ":"),
        )
        + "\n"
    )


def encode_before_only(
    pairs: list[tuple[Request, Recommendation]], records: int
) -> dict[str, float]:
    cpu = time.process_time()
    for n in range(records):
        encode_before(pairs[n % POOL])
    return {"cpu_us": (time.process_time() - cpu) / records * 1e6}


def summarise(sink: str, runs: list[dict[str, float]], extra: dict[str, Any]) -> str:
    cpu = [r["cpu_us"] for r in runs]
    line: dict[str, Any] = {
        "sink": sink,
        "records": extra.pop("records"),
        "cpu_us_per_record_best": round(min(cpu), 2),
        "cpu_us_per_record_median": round(statistics.median(cpu), 2),
    }
    if "wall_us" in runs[0]:
        line["wall_us_per_record_median"] = round(statistics.median(r["wall_us"] for r in runs), 2)
        for key in ("mean_batch", "bytes_per_record"):
            line[key] = round(statistics.median(r[key] for r in runs), 1)
        line["dropped"] = sum(r["dropped"] for r in runs)
        line["errors"] = sum(r["errors"] for r in runs)
    line.update(extra)
    line["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return json.dumps(line)


def run_file(
    pairs: list[tuple[Request, Recommendation]], args: argparse.Namespace, *, compressed: bool
) -> str:
    """``file``: the served defaults, and every record compressed in the end (the file still
    open at the stop is compressed by the next writer, which is timed too): the steady-state
    cost of a record on disk. ``file-plain``: files too large to rotate, nothing compressed."""
    runs = []
    files = 0
    max_bytes = ServeSettings().exposure_max_bytes if compressed else 1 << 62
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="bench-exposure-") as tmp:
            directory = Path(tmp) / "exposures"
            writer = RotatingFileWriter(directory, max_bytes=max_bytes)
            run = asyncio.run(through_sink(writer, pairs, args.records, args.burst))
            if compressed:
                cpu = time.process_time()
                RotatingFileWriter(directory).compress_closed_files()
                run["cpu_us"] += (time.process_time() - cpu) / args.records * 1e6
            runs.append(run)
            stats = ExposureReadStats()
            read = sum(1 for _ in iter_exposure_lines(directory, stats))
            if read != args.records or stats.skipped:
                raise SystemExit(f"file sink: read back {read} records, {stats}")
            files = stats.files
            on_disk = sum(p.stat().st_size for p in directory.glob("*.jsonl*"))
    extra = {
        "records": args.records,
        "files": files,
        "disk_bytes_per_record": on_disk // args.records,
    }
    return summarise("file" if compressed else "file-plain", runs, extra)


def run_redis(pairs: list[tuple[Request, Recommendation]], args: argparse.Namespace) -> str:
    client = redis.Redis.from_url(args.redis, socket_connect_timeout=1.0)
    try:
        client.ping()
    except redis.RedisError as e:
        return json.dumps({"sink": "redis", "skipped": f"no Redis at {args.redis}: {e}"})
    runs = []
    try:
        for _ in range(args.repeats):
            key = f"bench-exposure-{uuid.uuid4().hex}"
            try:
                writer = RedisStreamWriter(args.redis, key, maxlen=args.records * 2)
                runs.append(asyncio.run(through_sink(writer, pairs, args.records, args.burst)))
                stored = int(client.xlen(key))
                if stored != args.records:
                    raise SystemExit(f"redis sink: {stored} entries of {args.records}")
            finally:
                client.delete(key)
    finally:
        client.close()
    return summarise("redis", runs, {"records": args.records, "url": args.redis})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--burst", type=int, default=16, help="records per loop turn")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--candidates-share", type=float, default=0.01)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--sinks", default="encode-before,encode,file-plain,file,redis", help="comma-separated"
    )
    args = parser.parse_args()
    pairs = realistic_records(args.candidates_share)
    sinks: dict[str, Callable[[], str]] = {
        "encode": lambda: summarise(
            "encode",
            [encode_only(pairs, args.records) for _ in range(args.repeats)],
            {"records": args.records},
        ),
        "encode-before": lambda: summarise(
            "encode-before",
            [encode_before_only(pairs, args.records) for _ in range(args.repeats)],
            {"records": args.records},
        ),
        "file-plain": lambda: run_file(pairs, args, compressed=False),
        "file": lambda: run_file(pairs, args, compressed=True),
        "redis": lambda: run_redis(pairs, args),
    }
    for name in args.sinks.split(","):
        print(sinks[name](), flush=True)


if __name__ == "__main__":
    main()
