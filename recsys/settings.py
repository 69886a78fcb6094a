"""Typed settings, read once at the edge (CLI flags and RECSYS_* variables), frozen, passed down."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ARTIFACTS = Path("artifacts")


@dataclass(frozen=True)
class BuildSettings:
    out: Path = DEFAULT_ARTIFACTS
    skus: int = 100_000
    users: int = 10_000
    seed: int = 7
    dim: int = 32
    progress: bool = True


@dataclass(frozen=True)
class ServeSettings:
    artifacts: Path = DEFAULT_ARTIFACTS
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9100
    metrics_host: str = ""
    """Address of the metrics endpoint; empty: ``host``. Workers of ``--workers N`` use the
    loopback: only the parent's merged endpoint is published."""
    control: str = ""
    """Control-plane URL: empty for the file backend in the artifact root, or redis://HOST:PORT/DB."""
    workers: int = 1
    batch_max_size: int = 32
    batch_max_delay_ms: float = 0.0
    """0: natural batching (a batch is whatever queued while the executor was busy). Measured
    at low load on the default world, before compiled scoring (`python -m
    benchmarks.bench_latency --artifacts DIR --serve-arg=--batch-max-delay-ms=N`): p50 5.4 ms
    at 0 against 8.5 ms at 2."""
    executor_threads: int = 2
    cache_entries: int = 50_000
    """Result cache size in recommendations (0: off; about 1.5 KB each at 20 results, so the
    default is ~75 MB per worker); see serving/cache.py."""
    max_in_flight: int = 512
    """Recommend calls served at once; beyond it, RESOURCE_EXHAUSTED at once (0: no bound)."""
    max_queue: int = 1_000
    """Requests waiting for a batch; beyond it, RESOURCE_EXHAUSTED at once."""
    max_queue_delay_ms: float = 50.0
    """When the oldest waiting request has waited this long, new ones get RESOURCE_EXHAUSTED."""
    reuse_port: bool = False
    """Share the port with sibling worker processes (SO_REUSEPORT; set by ``--workers N``)."""
    exposure_queue_size: int = 10_000
    exposure_dir: Path | None = None
    """The exposure log's own directory, outside the artifact root (which pods mount read-only):
    the records, and ``snapshots/`` with the manifest of every snapshot that served. None:
    ``exposures/`` beside the artifact root (see :attr:`exposure_path`)."""
    exposure_candidates_share: float = 0.01
    """Share of requests (by request id hash) whose record keeps every ranked candidate."""
    drain_seconds: float = 10.0
    control_poll_seconds: float = 1.0
    control_prefix: str = "recsys:"
    """Key prefix in Redis, so several deployments (or tests) can share one server."""
    feature_store: str = ""
    """Where user feature rows are read: empty for the memory-mapped feature tables, or
    redis://HOST:PORT/DB for the online store (keys under ``control_prefix``), falling back to
    the tables when Redis is slow or down (ranking/feature_store.py)."""
    feature_store_timeout_ms: float = 5.0
    """How long a batch waits for the online feature store before it serves the local copy,
    flagged degraded. Part of every uncached request's latency budget."""
    exposure_sink: str = ""
    """Where exposure records go: empty for rotating files in :attr:`exposure_path`, or
    redis://HOST:PORT/DB for a Redis Stream (``exposure_stream``), which ``recsys exposures
    archive`` moves into files (docs/exposures.md)."""
    exposure_stream: str = "recsys:exposures"
    exposure_stream_maxlen: int = 1_000_000
    """Entries the stream keeps (``XADD MAXLEN ~``), archived or not. Measured at about 2.8 KB
    of Redis memory an entry (20 items and the feature row): 2.8 GB at the default, so use a
    Redis of its own; the archiver may be down for maxlen / (records per second) before
    unread entries are trimmed (the archiver counts and logs them)."""
    exposure_max_bytes: int = 64 * 1024 * 1024
    """Rotate an exposure file once it holds this much (about 30,000 records of 2.2 kB)."""
    exposure_max_age_seconds: float = 3600.0
    """Rotate an exposure file open this long, at its next write."""

    @property
    def exposure_path(self) -> Path:
        """Where exposure records and snapshot manifests go."""
        return self.exposure_dir or default_exposure_dir(self.artifacts)


def default_exposure_dir(artifacts: Path) -> Path:
    """``exposures/`` beside the artifact root: its own directory, outside the root."""
    return artifacts.absolute().parent / "exposures"


def env_default(name: str, default: str, environ: Mapping[str, str] | None = None) -> str:
    """``RECSYS_<NAME>`` from the environment, else ``default`` (used for CLI flag defaults)."""
    env = os.environ if environ is None else environ
    return env.get(f"RECSYS_{name.upper()}", default)
