"""Prometheus metrics of one server, in a registry the server owns (never the global one).

:class:`ServingMetrics` is the only place that knows Prometheus. The servicer, the exposure sink
and the micro-batchers report through plain methods, and the pipeline receives the same object
at open time so it can report the control plane's health and the live score distribution.
Every name starts with ``recsys_`` (besides the standard ``process_*`` and ``python_*``).
Label sets that come from data (experiments, degraded reasons, model versions) are capped; what
does not fit is counted under ``other``.

With ``--workers N`` the parent merges the workers' expositions (serving/workers.py): counters
and histograms are summed, and so are gauges, unless :data:`GAUGE_MERGE` names another rule for
one. A gauge that is a state rather than an amount (connected, a timestamp, a limit) belongs
there.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIServer

import numpy as np
import numpy.typing as npt
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import HistogramMetricFamily, Metric

from recsys.ranking.stages import DEADLINE_UNRANKED, STALE_USER_VECTOR
from recsys.retrieval.stage import UNKNOWN_USER
from recsys.serving.batching import BatchStats
from recsys.types import Encodings, Recommendation, ServingVersions

OTHER = "other"
GAUGE_MERGE: dict[str, str] = {
    # 1 only while every worker's watcher is connected (a sum would read 2 with 2 workers).
    "recsys_control_plane_connected": "min",
    "process_start_time_seconds": "min",  # the oldest process of the pod
    "process_max_fds": "min",  # the tightest limit
    # The drift monitor's statistics (serving/drift_metrics.py): a PSI is not a sum; the pod
    # reports its worst worker's window, and the window sizes of its smallest, so an alert
    # rule's minimum sample size holds for every worker's window it judges. Drops: summed.
    "recsys_drift_psi": "max",
    "recsys_drift_js": "max",
    "recsys_feature_nan_share": "max",
    "recsys_feature_out_of_range_share": "max",
    "recsys_drift_window_seconds": "max",
    "recsys_drift_window_rows": "min",
    "recsys_drift_window_requests": "min",
}
"""How the parent of ``--workers N`` merges a gauge across workers (``min``, ``max``; any gauge
not named here: ``sum``), named as prometheus_client's ``multiprocess_mode`` names them."""
DEGRADED_REASON_LABELS: dict[str, str] = {
    STALE_USER_VECTOR: "stale_user_vector",
    DEADLINE_UNRANKED: "deadline_unranked",
    UNKNOWN_USER: "unknown_user",
}
"""The ``reason`` label of ``recsys_degraded_responses``: a short enum per degraded reason (the
response and the exposure record carry the sentence); a reason not named here counts as
``other``."""
LATENCY_BUCKETS = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip
QUEUE_DELAY_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
DEFAULT_SCORE_BUCKETS: tuple[float, ...] = (
    *(-5.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.5),
    *(round(0.05 * i, 2) for i in range(21)),
    *(1.5, 2.0, 3.0, 4.0, 5.0),
)
"""Fine steps over [0, 1] (probabilities) and coarse ones out to +-5 (raw ranking scores).
A model version whose training baseline uses other edges registers them with
:meth:`ServingMetrics.set_score_buckets`, so live and baseline histograms compare bin by bin."""


_Metric = TypeVar("_Metric", Counter, Histogram)


class CappedLabels:
    """Admit at most ``cap`` distinct label tuples; later new ones map to ``("other", ...)``."""

    def __init__(self, cap: int, width: int) -> None:
        if cap < 1:
            raise ValueError(f"label cap is {cap}; expected >= 1")
        self._cap = cap
        self._other = (OTHER,) * width
        self._seen: set[tuple[str, ...]] = set()
        self._lock = threading.Lock()

    def admit(self, labels: tuple[str, ...]) -> tuple[str, ...]:
        if labels in self._seen:
            return labels
        with self._lock:
            if len(self._seen) < self._cap:
                self._seen.add(labels)
                return labels
        return self._other


def _counted(answer: Recommendation) -> bool:
    """Whether an answer's scores go into the live score histogram: it has items and they were
    ranked (answers in retrieval order carry retrieval scores, on another scale)."""
    return bool(len(answer.items)) and DEADLINE_UNRANKED not in answer.degraded_reasons


def _check_edges(edges: Sequence[float]) -> npt.NDArray[np.float64]:
    array = np.asarray(edges, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"score buckets are {edges!r}; expected a non-empty list of numbers")
    if not np.isfinite(array).all() or (np.diff(array) <= 0).any():
        raise ValueError(f"score buckets are {edges!r}; expected finite, strictly increasing")
    return array


ScoreCounts = tuple[npt.NDArray[np.float64], npt.NDArray[np.int64], float]
"""One answer's scores as (edges, bucket counts under them, sum), reused while the edges hold.
A plain tuple of arrays and a float: the garbage collector stops tracking such a tuple at its
first pass, and cached answers keep it (serving/cache.py)."""


def _bucket(
    edges: npt.NDArray[np.float64], score_arrays: Sequence[npt.ArrayLike]
) -> list[ScoreCounts]:
    """Each array's bucket counts and sum of its finite scores under ``edges``, one
    ``searchsorted`` and one ``bincount`` for them all. searchsorted "left": bounds[i-1] < x <=
    bounds[i], Prometheus' "le" semantics."""
    arrays = [np.asarray(a, dtype=np.float64).ravel() for a in score_arrays]
    values = np.concatenate(arrays)
    owner = np.repeat(np.arange(len(arrays)), [a.size for a in arrays])
    finite = np.isfinite(values)
    values, owner = values[finite], owner[finite]
    width = edges.size + 1
    buckets = np.searchsorted(edges, values, side="left")
    counts = np.bincount(owner * width + buckets, minlength=len(arrays) * width)
    totals = np.bincount(owner, weights=values, minlength=len(arrays))
    rows = counts.reshape(len(arrays), width).astype(np.int64)
    return [(edges, row, float(t)) for row, t in zip(rows, totals, strict=True)]


class ScoreHistograms:
    """A histogram family per model version, filled a whole score array at a time.

    prometheus_client's Histogram observes one value per call; scores arrive as arrays, so this
    collector keeps numpy bucket counts and renders them at scrape time.
    """

    def __init__(
        self, name: str, documentation: str, edges: Sequence[float], max_versions: int
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._default_edges = _check_edges(edges)
        self._edges: dict[str, npt.NDArray[np.float64]] = {}
        self._counts: dict[str, npt.NDArray[np.int64]] = {}
        self._sums: dict[str, float] = {}
        self._versions = CappedLabels(max_versions, 1)
        self._lock = threading.Lock()

    def set_edges(self, version: str, edges: Sequence[float]) -> None:
        checked = _check_edges(edges)
        with self._lock:
            self._edges[version] = checked
            self._counts.pop(version, None)
            self._sums.pop(version, None)

    def count_ahead(self, answers: Sequence[Recommendation]) -> None:
        """Fill each computed answer's ``encodings.score_counts`` for the edges of its version,
        one vectorised pass per version for a whole batch (the batch's thread calls this, so
        :meth:`observe` on the event loop only adds the counts). Changes no series."""
        groups: dict[str, list[Recommendation]] = {}
        for answer in answers:
            if answer.encodings is not None and _counted(answer):
                groups.setdefault(answer.model_version, []).append(answer)
        for version, group in groups.items():
            (key,) = self._versions.admit((version,))
            with self._lock:
                edges = self._edges.get(key, self._default_edges)
            counted = _bucket(edges, [a.items.scores for a in group])
            for answer, memo in zip(group, counted, strict=True):
                assert answer.encodings is not None
                answer.encodings.score_counts = memo

    def observe(
        self, version: str, scores: npt.ArrayLike, encodings: Encodings | None = None
    ) -> None:
        """Count ``scores`` under ``version``. With ``encodings`` (the answer's, shared by its
        cache hits) the bucket counts are computed once per answer and edges, then added."""
        (key,) = self._versions.admit((version,))
        with self._lock:
            edges = self._edges.get(key, self._default_edges)
            memo = None if encodings is None else encodings.score_counts
            if isinstance(memo, tuple) and memo[0] is edges:
                _, counts, total = memo
            else:
                (made,) = _bucket(edges, [scores])
                _, counts, total = made
                if encodings is not None:
                    encodings.score_counts = made
            if key in self._counts:
                self._counts[key] += counts
                self._sums[key] += total
            else:
                self._counts[key] = counts.copy()
                self._sums[key] = total

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self._name, self._documentation, labels=["model_version"])]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=["model_version"])
        with self._lock:
            snapshot = [
                (v, self._edges.get(v, self._default_edges), c.copy(), self._sums[v])
                for v, c in self._counts.items()
            ]
        for version, edges, counts, total in snapshot:
            cumulative = np.cumsum(counts).tolist()
            bounds = [repr(e) for e in edges.tolist()] + ["+Inf"]
            family.add_metric([version], list(zip(bounds, cumulative, strict=True)), total)
        yield family


class ServingMetrics:
    """All recsys_ series of one server process, and the HTTP endpoint that serves them."""

    def __init__(
        self,
        *,
        max_exposure_label_sets: int = 5_000,
        max_degraded_reasons: int = 100,
        max_model_versions: int = 200,
        score_buckets: Sequence[float] = DEFAULT_SCORE_BUCKETS,
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_*: CPU seconds, memory, open files, start time
        PlatformCollector(registry=r)  # python_info
        self._requests = Counter(
            "recsys_requests", "Recommend calls by gRPC status code.", ["code"], registry=r
        )
        self._latency = Histogram(
            "recsys_request_duration_seconds",
            "Recommend wall time in the servicer, any outcome.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._stage_latency = Histogram(
            "recsys_stage_duration_seconds",
            "Wall time of each pipeline stage (a batched stage counts its whole batch).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._in_flight = Gauge(
            "recsys_requests_in_flight", "Recommend calls being served now.", registry=r
        )
        self._calls_in_flight = 0  # a plain int on the request path, read at scrape time
        self._in_flight.set_function(lambda: self._calls_in_flight)
        self._children: dict[tuple[object, ...], Any] = {}
        self._model_info = Info(
            "recsys_model", "Production version serving per model name.", ["name"], registry=r
        )
        self._index_info = Info("recsys_index", "FAISS index version serving.", registry=r)
        self._config_info = Info("recsys_config", "Control-plane config version.", registry=r)
        self._degraded = Counter(
            "recsys_degraded_responses",
            "Responses served in a degraded mode, by reason (stale_user_vector, "
            "deadline_unranked, unknown_user, other).",
            ["reason"],
            registry=r,
        )
        self._batch_size = Histogram(
            "recsys_batch_size",
            "Items per micro-batch.",
            ["batcher"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self._batch_delay = Histogram(
            "recsys_batch_queue_delay_seconds",
            "Time an item waited between submit and the start of its batch.",
            ["batcher"],
            buckets=QUEUE_DELAY_BUCKETS,
            registry=r,
        )
        self._batch_run = Histogram(
            "recsys_batch_run_seconds",
            "Wall time of the batch function.",
            ["batcher"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._gc_pause = Histogram(
            "recsys_gc_pause_seconds",
            "Garbage-collection passes of this process by generation (every thread stalls).",
            ["generation"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5),
            registry=r,
        )
        self._gc_collected = Counter(
            "recsys_gc_collected_objects",
            "Unreachable objects the garbage collector freed, by generation: garbage in "
            "reference cycles, which reference counting alone never frees.",
            ["generation"],
            registry=r,
        )
        self._exposures_written = Counter(
            "recsys_exposure_records_written", "Exposure log lines written.", registry=r
        )
        self._exposures_dropped = Counter(
            "recsys_exposure_records_dropped",
            "Exposure records dropped (queue full or write failed).",
            registry=r,
        )
        self._exposure_sink_errors = Counter(
            "recsys_exposure_sink_errors",
            "Exposure sink failures: batches whose write raised (their records count as "
            "dropped) and failed closes.",
            registry=r,
        )
        self._exposures = Counter(
            "recsys_experiment_exposures",
            "Responses per experiment arm (label sets capped; overflow under 'other').",
            ["layer", "experiment", "arm"],
            registry=r,
        )
        self._control_connected = Gauge(
            "recsys_control_plane_connected",
            "1 while the control-plane backend answers the watcher of this document.",
            ["document"],
            registry=r,
            multiprocess_mode="min",  # as GAUGE_MERGE says for the parent's merge
        )
        self._control_from_last_good = Gauge(
            "recsys_control_from_last_good",
            "1 while this document is served from the server's local last-good copy (it "
            "started with the store unreachable or its document corrupt or invalid), until the "
            "store gives a version that applies.",
            ["document"],
            registry=r,
        )
        self._control_rejected = Counter(
            "recsys_control_rejected_documents",
            "Control-plane documents rejected by validation (last good snapshot kept).",
            ["document"],
            registry=r,
        )
        self._model_rejected = Counter(
            "recsys_model_rejected",
            "Model versions refused before serving, by reason (schema, golden, nan, latency, "
            "corrupt, other); label sets capped, overflow under 'other'.",
            ["name", "version", "reason"],
            registry=r,
        )
        self._model_rejected_labels = CappedLabels(max_model_versions, 3)
        self._compile_fallbacks = Counter(
            "recsys_model_compile_fallbacks",
            "Model versions loaded to score with LightGBM although compilation is on (the "
            "compiled engine failed on this node; about 3x the CPU per call). The log says why.",
            ["name"],
            registry=r,
        )
        self._cache_lookups = Counter(
            "recsys_result_cache_lookups",
            "Result cache lookups by result (hit rate: hit / (hit + miss)).",
            ["result"],
            registry=r,
        )
        self._cache_entries = Gauge(
            "recsys_result_cache_entries", "Recommendations held in the result cache.", registry=r
        )
        self._cache_entries_now = 0  # a plain int on the request path, read at scrape time
        self._cache_entries.set_function(lambda: self._cache_entries_now)
        self._scores = ScoreHistograms(
            "recsys_live_score",
            "Scores served, per model version (compare with the training baseline).",
            score_buckets,
            max_model_versions,
        )
        r.register(self._scores)
        self._exposure_labels = CappedLabels(max_exposure_label_sets, 3)
        self._versions: ServingVersions | None = None
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    # Request path (the servicer).

    def request_started(self) -> None:
        self._calls_in_flight += 1

    def request_finished(self, code: str, seconds: float) -> None:
        self._calls_in_flight -= 1
        self._child(self._requests, code).inc()
        self._latency.observe(seconds)

    def observe_recommendation(self, recommendation: Recommendation) -> None:
        """Stage timings, degraded reasons, experiment exposures and scores of one response."""
        child = self._child
        for stage, seconds in recommendation.stage_seconds:
            child(self._stage_latency, stage).observe(seconds)
        for reason in recommendation.degraded_reasons:
            child(self._degraded, DEGRADED_REASON_LABELS.get(reason, OTHER)).inc()
        for e in recommendation.exposures:
            labels = self._exposure_labels.admit((e.layer, e.experiment, e.arm))
            child(self._exposures, *labels).inc()
        if _counted(recommendation):
            self._scores.observe(
                recommendation.model_version, recommendation.items.scores, recommendation.encodings
            )

    def _child(self, metric: _Metric, *labels: str) -> _Metric:
        """``metric.labels(*labels)``, kept: the request path asks for the same few per call.
        (Only for label sets that are never removed, and capped where they come from data.)"""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def observe_versions(self, versions: ServingVersions) -> None:
        """Refresh the info metrics; cheap when nothing changed (call it per request)."""
        if versions is self._versions or versions == self._versions:
            return
        previous = self._versions.model_versions if self._versions else {}
        for name in previous.keys() - versions.model_versions.keys():
            self._model_info.remove(name)
        for name, version in versions.model_versions.items():
            self._model_info.labels(name).info({"version": version})
        self._index_info.info({"version": versions.index_version})
        self._config_info.info({"version": versions.config_version})
        self._versions = versions

    # Drift (the servicer for served items; the pipeline may register baseline edges).

    def observe_scores(self, model_version: str, scores: npt.ArrayLike) -> None:
        self._scores.observe(model_version, scores)

    def count_scores_ahead(self, answers: Sequence[Recommendation]) -> None:
        """Bucket the scores of a batch's answers ahead of :meth:`observe_recommendation`
        (:meth:`ScoreHistograms.count_ahead`)."""
        self._scores.count_ahead(answers)

    def set_score_buckets(self, model_version: str, edges: Sequence[float]) -> None:
        """Use the training baseline's bin edges for this model version's live histogram."""
        self._scores.set_edges(model_version, edges)

    # Result cache (the pipeline).

    def observe_cache(self, hit: bool, entries: int) -> None:
        self._child(self._cache_lookups, "hit" if hit else "miss").inc()
        self._cache_entries_now = entries

    # Micro-batching (pass as MicroBatcher(observer=metrics.observe_batch)).

    def observe_gc_pause(self, generation: int, seconds: float, collected: int) -> None:
        self._gc_pause.labels(str(generation)).observe(seconds)
        if collected:
            self._gc_collected.labels(str(generation)).inc(collected)

    def observe_batch(self, stats: BatchStats) -> None:
        self._batch_size.labels(stats.name).observe(stats.size)
        self._batch_run.labels(stats.name).observe(stats.run_seconds)
        delay = self._batch_delay.labels(stats.name)
        for seconds in stats.queue_delays:
            delay.observe(seconds)

    # Exposure sink.

    def exposures_written(self, count: int) -> None:
        self._exposures_written.inc(count)

    def exposures_dropped(self, count: int) -> None:
        self._exposures_dropped.inc(count)

    def exposure_sink_errors(self, count: int) -> None:
        self._exposure_sink_errors.inc(count)

    # Control plane (the pipeline).

    def set_control_connected(self, document: str, connected: bool) -> None:
        self._control_connected.labels(document).set(1 if connected else 0)

    def set_control_from_last_good(self, document: str, from_copy: bool) -> None:
        self._control_from_last_good.labels(document).set(1 if from_copy else 0)

    def control_document_rejected(self, document: str) -> None:
        self._control_rejected.labels(document).inc()

    def model_rejected(self, name: str, version: str, reason: str) -> None:
        labels = self._model_rejected_labels.admit((name, version, reason))
        self._model_rejected.labels(*labels).inc()

    def model_compile_fallback(self, name: str, version: str) -> None:
        """A version of model ``name`` scores with LightGBM: the compiled engine failed."""
        self._compile_fallbacks.labels(name).inc()

    # HTTP endpoint.

    def start_http(self, host: str, port: int) -> int:
        """Serve /metrics on ``host:port`` (0 picks a free port); returns the bound port."""
        if self._http is not None:
            raise RuntimeError("metrics HTTP endpoint is already started")
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = (server, thread)
        return int(server.server_port)

    def stop_http(self) -> None:
        """Stop the endpoint (blocks up to half a second: run it off the event loop)."""
        if self._http is None:
            return
        server, thread = self._http
        self._http = None
        server.shutdown()
        server.server_close()
        thread.join()
