"""``recsys serve --workers N``: N server processes on one port, one metrics endpoint.

The parent starts N worker processes (``spawn``: gRPC must not be forked). Each worker is a
complete single-process server (serving/server.py) bound with SO_REUSEPORT, so the kernel
spreads incoming connections over them; each loads the same artifact root, whose world,
feature tables and vectors are memory-mapped read-only and so shared through the page cache.

With as many CPUs as workers (``--pin-workers auto``, the default), worker n runs on the n-th of
them alone, every thread of it (:func:`worker_cpus`, :func:`pin_process`).

Metrics: each worker serves its own registry on a private port on the loopback; the parent's
``/metrics`` on the configured port scrapes them all and merges the samples (sums for counters,
histograms and gauges, so in-flight calls and cache entries add up, except the gauges
serving/metrics.py's ``GAUGE_MERGE`` names, such as ``recsys_control_plane_connected``, the
lowest over workers; the highest value for info series), plus ``recsys_workers`` (how many
answered the scrape). The ``process_*`` series cover the whole pod: the parent's own process
merged with the workers' (CPU seconds and memory summed, the earliest start time).

SIGTERM or SIGINT to the parent is forwarded to every worker, each drains as one server does,
and the parent exits once all have. If a worker dies on its own, the parent stops the others and
exits non-zero, so the supervisor (Kubernetes) restarts the pod as a whole.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import multiprocessing
import os
import signal
import socket
import threading
import urllib.request
from collections.abc import Collection, Iterable, Iterator
from dataclasses import replace
from multiprocessing.process import BaseProcess
from types import FrameType

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import generate_latest, start_http_server
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from recsys.serving.logs import configure_logging
from recsys.serving.metrics import GAUGE_MERGE
from recsys.serving.server import BindError
from recsys.settings import PIN_WORKERS, ServeSettings

log = logging.getLogger(__name__)

WORKER_METRICS_HOST = "127.0.0.1"
SCRAPE_TIMEOUT_SECONDS = 2.0


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def reserve_port(host: str, port: int, setting: str) -> socket.socket:
    """A bound (not listening) SO_REUSEPORT socket: fixes the port number for the workers when
    ``port`` is 0, and keeps another program from taking it while they start. Raises
    :class:`BindError` naming ``setting`` when the port cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))
    except OSError as e:
        s.close()
        why = "address already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise BindError(setting, host, port, why) from e
    return s


def merge_families(texts: Iterable[str]) -> list[Metric]:
    """Merge Prometheus text expositions of several processes into one set of families.

    Counters and histograms are summed; gauges too, unless :data:`GAUGE_MERGE` says ``min`` or
    ``max``; info series (text: gauges named ``*_info``) take the highest value.
    """
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            merged = values[family.name]
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue  # a creation time: no meaning summed across processes
                key = (sample.name, tuple(sorted(sample.labels.items())))
                mode = GAUGE_MERGE.get(family.name, "sum") if family.type == "gauge" else "sum"
                if family.type == "info" or family.name.endswith("_info"):  # text: gauges
                    mode = "max"
                if key in merged and mode == "min":
                    merged[key] = min(merged[key], sample.value)
                elif key in merged and mode == "max":
                    merged[key] = max(merged[key], sample.value)
                elif mode in ("min", "max"):
                    merged[key] = sample.value
                else:
                    merged[key] = merged.get(key, 0.0) + sample.value
    out = []
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
        out.append(family)
    return out


class WorkerMetrics:
    """A collector that scrapes the workers' endpoints and merges them at each parent scrape,
    with the parent's own ``process_*`` series."""

    def __init__(self, ports: list[int]) -> None:
        self._ports = ports
        self._parent = CollectorRegistry()
        ProcessCollector(registry=self._parent)

    def _scrape(self, port: int) -> str | None:
        url = f"http://{WORKER_METRICS_HOST}:{port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_SECONDS) as reply:
                body: bytes = reply.read()
                return body.decode()
        except OSError:
            return None  # a worker still starting or gone: counted by recsys_workers

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        texts = [t for t in (self._scrape(p) for p in self._ports) if t is not None]
        up = GaugeMetricFamily("recsys_workers", "Worker processes that answered this scrape.")
        up.add_metric([], len(texts))
        yield up
        yield from merge_families([*texts, generate_latest(self._parent).decode()])


def worker_cpus(allowed: Collection[int], workers: int, pin: str) -> list[int | None]:
    """The CPU each of ``workers`` runs on alone (None: any of ``allowed``), by ``pin``
    (:data:`PIN_WORKERS`): ``auto`` pins only when ``allowed`` holds exactly one CPU a worker,
    as in a container given whole CPUs of its own; ``on`` pins worker n to the n-th CPU of
    ``allowed`` (in turn when there are more workers than CPUs); ``off`` never."""
    if pin not in PIN_WORKERS:
        raise ValueError(f"pin is {pin!r}; expected one of {', '.join(PIN_WORKERS)}")
    cpus = sorted(allowed)
    if pin == "off" or not cpus or (pin == "auto" and len(cpus) != workers):
        return [None] * workers
    return [cpus[n % len(cpus)] for n in range(workers)]


def pin_process(cpu: int) -> None:
    """Run every thread of this process on ``cpu`` alone: the threads already started (by the
    libraries imported so far, such as numpy's BLAS pool) one by one, and, through the calling
    thread, the ones started later (gRPC's, the batch thread), which inherit its CPU."""
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(task), {cpu})


def _worker_main(settings: ServeSettings, cpu: int | None = None) -> None:
    if cpu is not None:
        pin_process(cpu)
    configure_logging(settings.log_format)
    from recsys.serving.pipeline import open_pipeline
    from recsys.serving.server import run

    run(settings, open_pipeline)


def run_workers(settings: ServeSettings) -> int:
    """Serve with ``settings.workers`` processes until SIGTERM/SIGINT; returns the exit code."""
    if settings.workers < 2:
        raise ValueError(f"workers is {settings.workers}; expected >= 2 (1 runs in-process)")
    cpus = worker_cpus(os.sched_getaffinity(0), settings.workers, settings.pin_workers)
    reserved: list[socket.socket] = []

    def reserve(setting: str, wanted: int) -> int:
        """Reserve ``wanted`` (-1: off) for the workers; the port number, or -1."""
        if wanted < 0:
            return -1
        reserved.append(reserve_port(settings.host, wanted, setting))
        return int(reserved[-1].getsockname()[1])

    try:
        if settings.worker_port_stride:  # a port each
            ports = [
                reserve(
                    "port", settings.port + n * settings.worker_port_stride if settings.port else 0
                )
                for n in range(settings.workers)
            ]
        else:
            ports = [reserve("port", settings.port)] * settings.workers
        http_port = reserve("http_port", settings.http_port)
        health_port = reserve("health_port", settings.health_port)
        metric_ports = [free_port(WORKER_METRICS_HOST) for _ in range(settings.workers)]
        registry = CollectorRegistry()
        registry.register(WorkerMetrics(metric_ports))
        metrics_host = settings.metrics_host or settings.host
        try:
            http, http_thread = start_http_server(
                settings.metrics_port, addr=metrics_host, registry=registry
            )
        except OSError as e:
            why = "address already in use" if e.errno == errno.EADDRINUSE else str(e)
            raise BindError("metrics_port", metrics_host, settings.metrics_port, why) from e
    except BindError:
        for s in reserved:
            s.close()
        raise
    context = multiprocessing.get_context("spawn")
    workers: list[BaseProcess] = []
    stopping = threading.Event()

    def forward(signum: int, _frame: FrameType | None) -> None:
        stopping.set()
        for worker in workers:
            if worker.is_alive():
                worker.terminate()  # SIGTERM: the worker drains like a single server

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for n, (port, metrics_port) in enumerate(zip(ports, metric_ports, strict=True)):
            worker_settings = replace(
                settings,
                port=port,
                http_port=http_port,
                health_port=health_port,
                metrics_port=metrics_port,
                metrics_host=WORKER_METRICS_HOST,
                workers=1,
                reuse_port=True,
            )
            process = context.Process(
                target=_worker_main,
                args=(worker_settings, cpus[n]),
                name=f"recsys-worker-{n}",
            )
            process.start()
            workers.append(process)
        log.info(
            "recsys: %d workers on %s port %s (metrics on :%d), %s",
            len(workers),
            settings.host,
            ", ".join(map(str, sorted(set(ports)))),
            int(http.server_port),
            "not pinned"
            if cpus[0] is None
            else "on CPUs " + ", ".join(f"{n}: {cpu}" for n, cpu in enumerate(cpus)),
        )
        exit_code = 0
        while workers and any(w.is_alive() for w in workers):
            for worker in workers:
                worker.join(timeout=0.5)
                if not worker.is_alive() and not stopping.is_set():
                    log.error(
                        "%s exited with %s; stopping the others", worker.name, worker.exitcode
                    )
                    exit_code = 1
                    forward(signal.SIGTERM, None)
        if any(w.exitcode for w in workers):
            exit_code = 1
        return exit_code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join()
        http.shutdown()
        http.server_close()
        http_thread.join()
        for s in reserved:
            s.close()
