"""The drift monitor in a server: its windows fed by the batched path, exported at scrape time,
summarised to disk.

:class:`ServingMonitor` owns the :class:`~recsys.monitoring.windows.DriftWindows` of one server
process, registers :class:`DriftCollector` in the server's registry (its own collector, apart
from :class:`~recsys.serving.metrics.ServingMetrics`), and appends a summary of every window to
the summary log every ``summary_seconds`` from a background task (the write runs in a thread).

Series (labels: model_version, arm (``all``: the version over all arms), feature; the first two
capped by the windows' key cap,
the feature label by the model's schema; no user or sku label):

- ``recsys_drift_psi``, ``recsys_drift_js``: PSI and Jensen-Shannon distance of the window
  per feature and ``feature="score"``, against ``reference="training"`` (the baseline) and
  ``reference="live"`` (the version's first full live window; what the alerts use);
- ``recsys_feature_nan_share``, ``recsys_feature_out_of_range_share``;
- ``recsys_drift_window_rows`` and ``recsys_drift_window_requests{model_version, arm}``: the
  window's size (the alert rules ignore a window with fewer requests than their minimum);
- ``recsys_model_role{name, model_version, role}``: the routing's production, canary and
  previous versions (the CTR-drop alert joins on it);
- ``recsys_drift_window_seconds``, ``recsys_drift_dropped_batches``.

These are per process: a PSI is not a sum, so a parent merging workers must not add them
(take the max, or keep a worker label).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from recsys.monitoring.baseline import BaselineBins
from recsys.monitoring.summaries import SummaryLog
from recsys.monitoring.windows import DriftWindows, WindowStats
from recsys.ranking.routing import RoutingTable
from recsys.stage import Batch

log = logging.getLogger(__name__)

_LABELS = ["model_version", "arm", "feature"]


class DriftCollector:
    """Renders the windows' statistics when Prometheus scrapes."""

    def __init__(
        self, windows: DriftWindows, routing: Callable[[], RoutingTable | None] = lambda: None
    ) -> None:
        self.windows = windows
        self.routing = routing

    def describe(self) -> Iterable[Metric]:
        return []  # computed at scrape time: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        stats = self.windows.stats()
        psi = GaugeMetricFamily(
            "recsys_drift_psi",
            "PSI of the live window per feature (and feature=score) against the training "
            "baseline (reference=training) or the version's first full live window "
            "(reference=live).",
            labels=[*_LABELS, "reference"],
        )
        js = GaugeMetricFamily(
            "recsys_drift_js",
            "Jensen-Shannon distance (base 2) of the live window, references as for PSI.",
            labels=[*_LABELS, "reference"],
        )
        nan = GaugeMetricFamily(
            "recsys_feature_nan_share", "Share of NaN values in the window.", labels=_LABELS
        )
        out_of_range = GaugeMetricFamily(
            "recsys_feature_out_of_range_share",
            "Share of values outside the training range (or categories training never saw).",
            labels=_LABELS,
        )
        rows = GaugeMetricFamily(
            "recsys_drift_window_rows",
            "Served items binned in the drift window.",
            labels=["model_version", "arm"],
        )
        requests = GaugeMetricFamily(
            "recsys_drift_window_requests",
            "Requests in the drift window (the sample size the alert rules require).",
            labels=["model_version", "arm"],
        )
        for s in stats:
            key = [s.model_version, s.arm]
            rows.add_metric(key, s.rows)
            requests.add_metric(key, s.requests)
            for c in s.columns:
                labels = [*key, c.name]
                for family, value, reference in (
                    (psi, c.psi, "training"),
                    (psi, c.drift_psi, "live"),
                    (js, c.js, "training"),
                    (js, c.drift_js, "live"),
                ):
                    if not math.isnan(value):
                        family.add_metric([*labels, reference], value)
                for family, value in ((nan, c.nan_share), (out_of_range, c.out_of_range_share)):
                    if not math.isnan(value):
                        family.add_metric(labels, value)
        yield from (psi, js, nan, out_of_range, rows, requests)
        roles = GaugeMetricFamily(
            "recsys_model_role",
            "1 for each model version the routing names: production, canary or previous "
            "(the CTR-drop alert compares production with previous).",
            labels=["name", "model_version", "role"],
        )
        table = self.routing()
        for name, route in table.models.items() if table is not None else ():
            for role, version in (
                ("production", route.production),
                ("canary", route.canary),
                ("previous", route.previous),
            ):
                if version:
                    roles.add_metric([name, version, role], 1)
        yield roles
        yield GaugeMetricFamily(
            "recsys_drift_window_seconds",
            "Length of the drift monitor's sliding window.",
            value=self.windows.window_seconds,
        )
        yield GaugeMetricFamily(
            "recsys_drift_dropped_batches",
            "Batch counts not monitored because the (model version, arm) cap was reached.",
            value=self.windows.dropped,
        )


class ServingMonitor:
    """One server's drift windows, their Prometheus export and their summary log."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        window_seconds: float,
        summary_seconds: float,
        summary_dir: Path | None,
    ) -> None:
        self.windows = DriftWindows(window_seconds)
        self.summary_seconds = summary_seconds
        self.summaries = SummaryLog(summary_dir) if summary_dir is not None else None
        self.collector = DriftCollector(self.windows)
        registry.register(self.collector)
        self._task: asyncio.Task[None] | None = None

    def observe(self, batch: Batch, baselines: Mapping[str, BaselineBins]) -> None:
        """Add a batch's drift counts (called in the executor thread, after the stages)."""
        if batch.drift_counts:
            self.windows.add(batch.drift_counts, baselines)

    def stats(self) -> list[WindowStats]:
        """The current window of every (model version, arm): the Python API for callers in
        the process (the retraining loop, tests)."""
        return self.windows.stats()

    def start(self) -> None:
        if self.summaries is not None and self.summary_seconds > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._summarise(), name="drift-summaries"
            )

    async def _summarise(self) -> None:
        assert self.summaries is not None
        while True:
            await asyncio.sleep(self.summary_seconds)
            await self.flush()

    async def flush(self) -> None:
        """Append the current windows to the summary log (in a thread)."""
        if self.summaries is None:
            return
        try:
            await asyncio.to_thread(self.summaries.write_windows, self.windows.stats())
        except OSError as e:
            log.warning("drift summaries: cannot write to %s: %s", self.summaries.directory, e)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            await self.flush()
