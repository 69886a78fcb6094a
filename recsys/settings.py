"""Typed settings, read once at the edge (CLI flags and RECSYS_* variables), frozen, passed down."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

DEFAULT_ARTIFACTS = Path("artifacts")
PIN_WORKERS = ("auto", "on", "off")
"""The values of ``ServeSettings.pin_workers`` (recsys.serving.workers.worker_cpus)."""


@dataclass(frozen=True)
class RedisAuth:
    """How a process authenticates to Redis, beside what its URLs say (``rediss://`` for TLS,
    ``redis://USER@HOST:PORT/DB`` for an ACL user): see recsys/control/redis_auth.py."""

    password_file: Path | None = None
    """File holding the password (a mounted Secret), read at every new connection."""
    ca_file: Path | None = None
    """PEM CA certificates for ``rediss://`` servers (None: the system's roots)."""


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
    http_port: int = -1
    """Port of the HTTP/JSON endpoint (``POST /v1/recommend``, serving/rest.py) beside gRPC;
    -1: off (the default), 0: any free port."""
    health_port: int = -1
    """Port of a plaintext listener serving only the gRPC health service, outside the admission
    bounds (for kubelet probes); -1: off (the default: health on ``port`` only), 0: any."""
    metrics_host: str = "127.0.0.1"
    """Address of the metrics endpoint: the loopback unless told otherwise (``0.0.0.0`` for a
    Prometheus that scrapes the pod). Workers of ``--workers N`` always use the loopback: only
    the parent's merged endpoint is published."""
    control: str = ""
    """Control-plane URL: empty for the file backend in the artifact root, or redis://HOST:PORT/DB."""
    workers: int = 1
    pin_workers: str = "auto"
    """With ``workers`` > 1, whether worker n runs only on the n-th CPU the server may use:
    ``auto`` (the default) when the server may use exactly as many CPUs as it has workers (a
    container given whole CPUs of its own, or ``taskset``), ``on`` always (CPUs in turn when
    there are more workers), ``off`` never. A worker's event loop and batch thread share one
    interpreter lock, so they seldom run at once: on one CPU they keep its caches warm and
    lose little (benchmarks/README.md, "Fourteenth round")."""
    worker_port_stride: int = 0
    """With ``workers`` > 1: 0, every worker listens on ``port`` (SO_REUSEPORT: the kernel gives
    each connection to one of them); N > 0, worker n listens on ``port + n * N`` alone (any free
    port each when ``port`` is 0), for a front that balances calls over the workers itself
    (``recsys front``: one HTTP/2 connection to a shared port would reach one worker only)."""
    batch_max_size: int = 32
    batch_max_delay_ms: float = 0.0
    """0: natural batching (a batch is whatever queued while the executor was busy). Measured
    at low load on the default world, before compiled scoring (`python -m
    benchmarks.bench_latency --artifacts DIR --serve-arg=--batch-max-delay-ms=N`): p50 5.4 ms
    at 0 against 8.5 ms at 2."""
    executor_threads: int = 1
    """Threads running batches per worker: each batch's stages run in one of them. One: a
    second thread in the same process shares the interpreter lock with the first and with the
    event loop, and costs more CPU per request than it adds (4M world, uncached requests:
    1,315-1,382 µs of CPU a call with one thread against 1,486-1,593 with two; benchmarks/
    README.md, "Sixth round"). Use the cores with ``workers`` (one per core) instead: on 2 cores
    two workers served 1,305-1,419 uncached calls/s against 740-807 for one process
    (benchmarks/README.md, "Seventh round")."""
    search_threads: int = 1
    """FAISS threads per search in a batch thread (recsys.retrieval.index.set_search_threads):
    the cores are already used by the workers' batch threads side by side."""
    cache_entries: int = 50_000
    """Result cache size in recommendations (0: off; about 1.5 KB each at 20 results, so the
    default is ~75 MB per worker); see serving/cache.py. The cache keeps its answers in a form
    the garbage collector does not track: a full pass over a full default cache took 0.4 ms on
    the 4M world, as with it empty, against 69 ms with the answers as built
    (benchmarks/bench_gc_cache.py)."""
    max_in_flight: int = 512
    """Recommend calls served at once; beyond it, RESOURCE_EXHAUSTED at once (0: no bound)."""
    max_concurrent_rpcs: int = 64
    """Calls gRPC hands to this process at once (any method); beyond it gRPC answers
    RESOURCE_EXHAUSTED ("Concurrent RPC limit exceeded!") before any request is parsed or the
    servicer runs (0: no bound). Sized from the batch capacity: two full batches per executor
    thread (2 x ``batch_max_size`` 32: the running batch and the next one filling); a call
    beyond that could only wait. Rejecting there costs far less than in the servicer, which is
    what keeps sheds fast at overload (benchmarks/bench_overload.py). Change it with those
    two."""
    max_pending_rpcs: int = 32
    """Calls gRPC core holds for the event loop to pick up. grpc.aio takes calls from the core
    one at a time on the event loop, so a loop busy with the work it admitted falls behind and
    calls queue there, unseen, for seconds (admitted or shed alike). Beyond this many (refused
    with a probability rising to 1 at twice this many), gRPC core ends a new call at once on its
    own threads, before any Python runs; clients see CANCELLED. 0: gRPC's default (1,000, up
    to 3,000). One batch (``batch_max_size``) of calls waiting is ample at normal load."""
    max_queue: int = 1_000
    """Requests waiting for a batch; beyond it, RESOURCE_EXHAUSTED at once."""
    max_queue_delay_ms: float = 50.0
    """When the oldest waiting request has waited this long, new ones get RESOURCE_EXHAUSTED."""
    gc_gen0_threshold: int = 700
    """After loading, the loaded heap is frozen out of the garbage collector's passes and the
    young generation's threshold is set to this (Python's own default); 0 leaves the collector
    as Python configures it, nothing frozen. A young pass frees the cyclic garbage gRPC leaves
    per call (about six objects), so this sets how long each pass stalls a worker: 0.5-0.6 ms
    on average at 700 against 11-13 ms at 10,000 on the 4M world's mix, at the same or a
    lower share of the time. See serving/gc_tuning.py and benchmarks/README.md, "Nineteenth
    round"."""
    reuse_port: bool = False
    """Share the port with sibling worker processes (SO_REUSEPORT; set by ``--workers N``)."""
    exposure_queue_size: int = 10_000
    exposure_dir: Path | None = None
    """The exposure log's own directory, outside the artifact root (which pods mount read-only):
    the records, and ``snapshots/`` with the manifest of every snapshot that served. None:
    ``exposures/`` beside the artifact root (see :attr:`exposure_path`)."""
    exposure_candidates_share: float = 0.01
    """Share of requests (by request id hash) whose record keeps every ranked candidate."""
    shutdown_grace_seconds: float = 5.0
    """On SIGTERM/SIGINT, health turns NOT_SERVING at once but Recommend keeps being served this
    long before the drain starts, so load balancers and Kubernetes endpoints notice and stop
    sending (0: drain at once). The pod's terminationGracePeriodSeconds must cover it plus
    ``drain_seconds``."""
    drain_seconds: float = 10.0
    """After the grace, how long in-flight calls may take to finish; calls still running then
    get UNAVAILABLE (never CANCELLED), so clients retry elsewhere."""
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
    monitor_window_seconds: float = 300.0
    """The drift monitor's sliding window (PSI per feature per model version x arm)."""
    monitor_summary_seconds: float = 60.0
    """How often the drift windows are appended to ``monitor/`` in the exposure directory
    (0: never; ``recsys monitor report`` plots them)."""
    log_format: str = "text"
    """``text`` (for people) or ``json`` (one object per line: level, request id, versions; for
    log collectors), see serving/logs.py."""
    compiled_cache: Path | None = None
    """Where compiled models are cached: a writable directory of the pod's own (the machine
    code is built for this node's CPU), so the artifact root can be mounted read-only. None: the
    artifact root's ``compiled/``. Its parent and everything below must not be group or world
    writable; the server creates both when absent."""

    tls_cert: Path | None = None
    """PEM certificate (chain) of the gRPC port; with ``tls_key``, the port speaks TLS only.
    Reloaded when the file changes (serving/tls.py)."""
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    """PEM CA certificates: when given, clients must present a certificate signed by one
    (mutual TLS); a client without one is refused at the handshake."""
    redis_password_file: Path | None = None
    """File holding the password of every Redis URL of the server (control, feature store,
    exposure sink); the user is the URL's (``redis://USER@HOST:PORT/DB``). Read at every new
    connection, so a rotated Secret applies on reconnect."""
    redis_ca_file: Path | None = None
    """PEM CA certificates that sign the Redis servers' certificates, for ``rediss://`` URLs."""

    @property
    def redis_auth(self) -> RedisAuth:
        """How the server's Redis clients authenticate."""
        return RedisAuth(password_file=self.redis_password_file, ca_file=self.redis_ca_file)

    @property
    def exposure_path(self) -> Path:
        """Where exposure records and snapshot manifests go."""
        return self.exposure_dir or default_exposure_dir(self.artifacts)

    @property
    def monitor_path(self) -> Path:
        """Where the drift monitor's window summaries go."""
        return self.exposure_path / "monitor"


def default_exposure_dir(artifacts: Path) -> Path:
    """``exposures/`` beside the artifact root: its own directory, outside the root."""
    return artifacts.absolute().parent / "exposures"


KUBERNETES_SERVICE_LINK = re.compile(r"^(tcp|udp|sctp)://[^/]+:[0-9]+$")
"""The form of ``<SERVICE>_PORT`` that Kubernetes injects for every Service in the namespace
(``enableServiceLinks``): a Service named ``recsys`` sets ``RECSYS_PORT=tcp://10.0.0.1:50051``
and one named ``recsys-metrics`` sets ``RECSYS_METRICS_PORT``. Such a value is never ours: an
``env:`` entry of the pod spec overrides service links, so a value an operator set wins."""


def is_service_link(value: str) -> bool:
    """Whether ``value`` has the form Kubernetes gives ``<SERVICE>_PORT`` (``tcp://IP:PORT``)."""
    return KUBERNETES_SERVICE_LINK.match(value) is not None


class SettingError(ValueError):
    """A ``RECSYS_*`` variable whose value does not fit its setting; the message names both."""


NUMERIC_FIELDS: dict[str, tuple[type[int] | type[float], str]] = {
    f.name: ((int, "an integer") if f.type == "int" else (float, "a number"))
    for settings in (ServeSettings, BuildSettings)
    for f in fields(settings)
    if f.type in ("int", "float")
}


def env_default(
    name: str, default: str, environ: Mapping[str, str] | None = None, *, flag: str = ""
) -> str:
    """``RECSYS_<NAME>`` from the environment, else ``default`` (used for CLI flag defaults).

    A variable of a numeric setting that does not parse raises :class:`SettingError` (which
    ``recsys`` prints as one line), rather than the caller's ``int()`` failing with a traceback;
    ``flag`` names the command-line flag it is the default of, for that message.
    """
    env = os.environ if environ is None else environ
    variable = f"RECSYS_{name.upper()}"
    value = env.get(variable)
    if value is None:
        return default
    if name in NUMERIC_FIELDS:
        kind, expected = NUMERIC_FIELDS[name]
        try:
            kind(value)
        except ValueError:
            of = f" (the default of {flag})" if flag else ""
            raise SettingError(f"{variable}={value!r}{of}: expected {expected}") from None
    return value


@dataclass(frozen=True)
class TrackingSettings:
    """Where training runs and model versions are tracked (MLflow), read at the CLI edge."""

    artifacts: Path = DEFAULT_ARTIFACTS
    uri: str = ""
    """An MLflow tracking URI (``$MLFLOW_TRACKING_URI``, e.g. http://mlflow:5000 for a shared
    server); empty: the embedded sqlite store under the artifact root (:attr:`store_uri`)."""
    enabled: bool = True
    experiment: str = "recsys"

    @property
    def store_dir(self) -> Path:
        return self.artifacts / "mlflow"

    @property
    def store_uri(self) -> str:
        return self.uri or f"sqlite:///{(self.store_dir / 'mlflow.db').resolve()}"

    @property
    def artifact_location(self) -> str | None:
        """Where runs of a new experiment keep their files: under the artifact root for the
        embedded store, the server's default otherwise."""
        return None if self.uri else (self.store_dir / "artifacts").resolve().as_uri()
