"""`recsys monitor`: is the production model still good?

recsys monitor report [--since T] --out DIR      the HTML report (drift, quality, alerts)
recsys monitor quality [--since T] [--window S]  join exposures x outcomes, write quality windows
recsys monitor run --metrics-port P              the same, every --interval, exported to Prometheus

Drift windows are written by the servers themselves (``monitor/`` in the exposure directory,
every ``--monitor-summary-seconds``); quality needs the outcome events, so it is computed here,
outside the request path, from the exposure and outcome logs (docs/monitoring.md).
"""

from __future__ import annotations

import argparse
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from recsys.cli.common import CliError, parse_time
from recsys.cli.exposures import log_directory, log_directory_arguments
from recsys.linelog.reading import iter_log_lines
from recsys.monitoring.alerts import QUALITY_MIN_IMPRESSIONS
from recsys.monitoring.quality import QualityStats, quality_record, tumbling_windows
from recsys.monitoring.report import write_report
from recsys.monitoring.summaries import SummaryLog, iter_summaries
from recsys.outcomes.join import DEFAULT_LATE_SECONDS, join_outcomes
from recsys.outcomes.reader import iter_outcomes
from recsys.outcomes.sinks import default_outcome_dir


def add_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    parser = subparsers.add_parser(
        "monitor",
        help="is the production model still good: drift and online quality, report",
        description="Drift against the training baseline and online quality per model version "
        "and arm (docs/monitoring.md).",
    )
    actions = parser.add_subparsers(dest="monitor_command", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False, parents=[log_directory_arguments()])
    common.add_argument(
        "--monitor-dir",
        type=Path,
        help="window summaries (default: monitor/ in the exposure directory)",
    )
    common.add_argument("--since", help="from this time (ISO 8601 or epoch seconds)")

    report = actions.add_parser(
        "report", parents=[common], help="write the HTML report (index.html and PNGs) to --out"
    )
    report.add_argument("--out", type=Path, required=True, help="directory to write into")
    report.set_defaults(func=cmd_report)

    joined = argparse.ArgumentParser(add_help=False, parents=[common])
    joined.add_argument(
        "--outcomes", type=Path, help="outcome log (default: outcomes/ beside the artifact root)"
    )
    joined.add_argument(
        "--window", type=float, default=300.0, help="window seconds (default %(default)s)"
    )
    joined.add_argument(
        "--late-seconds",
        type=float,
        default=DEFAULT_LATE_SECONDS,
        help="how long after its exposure an event still joins (default %(default)s)",
    )
    quality = actions.add_parser(
        "quality", parents=[joined], help="join exposures x outcomes, append quality windows"
    )
    quality.add_argument("--until", help="up to this time (ISO 8601 or epoch seconds)")
    quality.set_defaults(func=cmd_quality)

    run = actions.add_parser(
        "run",
        parents=[joined],
        help="compute the latest quality window every --interval, serve /metrics",
    )
    run.add_argument("--metrics-host", default="127.0.0.1")
    run.add_argument("--metrics-port", type=int, default=9101)
    run.add_argument("--interval", type=float, default=60.0, help="seconds between windows")
    run.add_argument("--iterations", type=int, default=0, help="stop after N (0: run until killed)")
    run.set_defaults(func=cmd_run)


def _directories(args: argparse.Namespace) -> tuple[Path, Path]:
    exposures = log_directory(args.exposures, args.artifacts)
    return exposures, args.monitor_dir or exposures / "monitor"


def _positive(value: float, flag: str) -> float:
    if not value > 0 or math.isinf(value):
        raise CliError(f"{flag} is {value}; expected a finite number > 0")
    return value


def cmd_report(args: argparse.Namespace) -> int:
    _, monitor_dir = _directories(args)
    since = parse_time(args.since, "--since") if args.since else None
    if not monitor_dir.is_dir():
        raise CliError(f"--monitor-dir {monitor_dir}: no such directory (serve traffic first)")
    files = write_report(iter_summaries(monitor_dir, since=since), args.out)
    print(f"{files.index} ({len(files.images)} figures)")
    return 0


def _joined_windows(
    args: argparse.Namespace, since: float | None, until: float | None
) -> Iterator[list[QualityStats]]:
    exposures, _ = _directories(args)
    outcomes = args.outcomes or default_outcome_dir(args.artifacts)
    records = (
        record
        for _path, _n, record in iter_log_lines(exposures)
        if (since is None or float(record.get("ts", 0)) >= since)
        and (until is None or float(record.get("ts", 0)) < until)
    )
    events = iter_outcomes(outcomes, since=since)
    joined = join_outcomes(records, events, late_seconds=args.late_seconds)
    return tumbling_windows(joined, args.window, origin=since or 0.0)


def cmd_quality(args: argparse.Namespace) -> int:
    _positive(args.window, "--window")
    since = parse_time(args.since, "--since") if args.since else None
    until = parse_time(args.until, "--until") if args.until else None
    _, monitor_dir = _directories(args)
    log = SummaryLog(monitor_dir)
    written = 0
    for window in _joined_windows(args, since, until):
        written += log.append(quality_record(s, time.time()) for s in window)
        for s in window:
            if s.arm == "all":
                print(
                    f"{time.strftime('%H:%M:%S', time.gmtime(s.start))} {s.model_version} "
                    f"requests {s.requests} CTR {s.ctr:.4f} [{s.ctr_low:.4f}, {s.ctr_high:.4f}] "
                    f"orders {s.order_rate:.4f} NDCG@20 {s.ndcg:.3f}"
                )
    print(f"{written} quality windows appended to {monitor_dir}")
    return 0


class QualityCollector:
    """The latest quality window per (model version, arm), rendered at scrape time."""

    SERIES = (
        ("ctr", "recsys_online_ctr", "Clicks per impression."),
        ("ctr_low", "recsys_online_ctr_lower", "CTR, 95 % Wilson lower bound."),
        ("ctr_high", "recsys_online_ctr_upper", "CTR, 95 % Wilson upper bound."),
        ("order_rate", "recsys_online_order_rate", "Orders per impression."),
        ("order_low", "recsys_online_order_rate_lower", "Order rate, 95 % lower bound."),
        ("order_high", "recsys_online_order_rate_upper", "Order rate, 95 % upper bound."),
        ("ndcg", "recsys_online_ndcg20", "NDCG@20 of the served order, requests with a click."),
        ("ndcg_low", "recsys_online_ndcg20_lower", "NDCG@20, 95 % lower bound."),
        ("ndcg_high", "recsys_online_ndcg20_upper", "NDCG@20, 95 % upper bound."),
        ("impressions", "recsys_online_impressions", "Impressions in the window."),
        ("requests", "recsys_online_requests", "Joined requests in the window."),
    )

    REFERENCE_SERIES = (
        ("ctr_low", "recsys_online_ctr_reference_lower"),
        ("order_low", "recsys_online_order_rate_reference_lower"),
        ("ndcg_low", "recsys_online_ndcg20_reference_lower"),
    )

    def __init__(self) -> None:
        self.latest: list[QualityStats] = []
        self.references: dict[tuple[str, str], QualityStats] = {}
        """Per (version, arm): its first window with enough impressions (the quality-drop
        alert's reference, as the drift monitor's live reference)."""
        self._lock = threading.Lock()

    def set(self, stats: list[QualityStats]) -> None:
        with self._lock:
            self.latest = stats
            for s in stats:
                if s.impressions >= QUALITY_MIN_IMPRESSIONS:
                    self.references.setdefault((s.model_version, s.arm), s)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            latest = list(self.latest)
            references = list(self.references.values())
        for attr, name in self.REFERENCE_SERIES:
            family = GaugeMetricFamily(
                name, "The same bound in the reference window.", labels=["model_version", "arm"]
            )
            for s in references:
                value = float(getattr(s, attr))
                if not math.isnan(value):
                    family.add_metric([s.model_version, s.arm], value)
            yield family
        for attr, name, text in self.SERIES:
            family = GaugeMetricFamily(name, text, labels=["model_version", "arm"])
            for s in latest:
                value = float(getattr(s, attr))
                if not math.isnan(value):
                    family.add_metric([s.model_version, s.arm], value)
            yield family


def cmd_run(args: argparse.Namespace) -> int:
    window = _positive(args.window, "--window")
    interval = _positive(args.interval, "--interval")
    _, monitor_dir = _directories(args)
    collector = QualityCollector()
    registry = CollectorRegistry()
    registry.register(collector)
    server, thread = start_http_server(args.metrics_port, addr=args.metrics_host, registry=registry)
    print(f"recsys monitor: /metrics on {args.metrics_host}:{server.server_port}", flush=True)
    log = SummaryLog(monitor_dir)
    try:
        n = 0
        while args.iterations <= 0 or n < args.iterations:
            end = time.time() - args.late_seconds  # every event of the window has come
            start = end - window
            # Exposures of [start, end) only, windows aligned on start: one window.
            stats = [s for w in _joined_windows(args, start, end) for s in w]
            collector.set(stats)
            log.append(quality_record(s, time.time()) for s in stats)
            n += 1
            if args.iterations <= 0 or n < args.iterations:
                time.sleep(interval)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    return 0
