"""Does the monitor catch drift? Every scenario against a real server, detection time and false
alarms.

For each scenario (none, taste-shift, price-inflation, broken-feature, new-restaurants): start a
real server (``recsys serve`` in its own process, reading user rows from the online feature store
so a feature can break, result cache off, drift window ``--window-minutes`` simulated minutes),
drive it with ``recsys.simulation`` at ``--speed`` simulated seconds per wall second with the
scenario's change at ``--onset-minutes``, stop it, then judge what the monitor saw:

- drift: the server's own window summaries (written every tenth of a window), through the alert
  conditions of ops/prometheus/recsys-alerts.yml (``recsys.monitoring.alerts``: PSI against the
  live reference > 0.2 with >= 1000 requests, NaN > 1 %, out of range > 5 %);
- quality: exposures joined with the outcome events (clicks allowed ``--late-minutes`` late),
  every simulated minute over the last window, per model version over all arms: flagged when the
  95 % interval of CTR, order rate or NDCG@20 lies wholly below the first window's
  (``recsys.monitoring.alerts.quality_drops``).

*Flagged*: a condition first met; *alerted*: met at every evaluation for 5 simulated minutes
(the rules' ``for: 5m``), which is what pages someone. An alert before the onset, or anywhere in
``none``, is a false alarm; conditions met before the onset that never held 5 minutes are
listed. Prints one JSON line per scenario and a summary; ``--report-dir`` writes the HTML report
of one scenario's run and a headless Chromium screenshot of it; ``--judge-only`` judges the runs
kept in ``--work`` again without running them.

    python -m benchmarks.bench_drift --artifacts /tmp/small-world [--speed 8] [--rate 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from benchmarks.bench_latency import free_port, wait_serving_for
from recsys.linelog.reading import iter_log_lines
from recsys.monitoring.alerts import quality_drops, window_flags
from recsys.monitoring.quality import QualityStats, quality_record, quality_stats
from recsys.monitoring.report import write_report
from recsys.monitoring.summaries import SummaryLog, iter_summaries
from recsys.outcomes.join import JoinedRequest, join_outcomes
from recsys.outcomes.reader import iter_outcomes
from recsys.simulation.simulator import SimulateSettings, Simulation, load_simulated_world

SCENARIOS = ("none", "taste-shift", "price-inflation", "broken-feature", "new-restaurants")


def serve(args: argparse.Namespace, work: Path, prefix: str) -> tuple[subprocess.Popen[bytes], str]:
    port, metrics_port = free_port(), free_port()
    window = args.window_minutes * 60 / args.speed
    cmd = [
        sys.executable, "-m", "recsys.cli.main", "serve", "--artifacts", str(args.artifacts),
        "--port", str(port), "--metrics-port", str(metrics_port), "--cache-entries", "0",
        "--exposure-dir", str(work / "exposures"), "--feature-store", args.redis,
        "--control-prefix", prefix, "--monitor-window-seconds", f"{window:g}",
        "--monitor-summary-seconds", f"{window / 10:g}", "--max-queue-delay-ms", "2000",
        "--feature-store-timeout-ms", "100",
    ]  # fmt: skip
    log = (work / "server.log").open("wb")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"
    asyncio.run(wait_serving_for(target, 300))
    return server, target


def quality_evaluations(
    joined: list[JoinedRequest], start: float, args: argparse.Namespace
) -> tuple[list[tuple[float, QualityStats]], QualityStats | None]:
    """Every simulated minute t: the window [t - late - W, t - late) over all arms, as
    ``recsys monitor run`` computes it; and the reference (the first window)."""
    minute = 60 / args.speed
    window, late = args.window_minutes * minute, args.late_minutes * minute
    out: list[tuple[float, QualityStats]] = []
    t = start + window + late
    end = max(j.ts for j in joined) if joined else start
    while t <= end + late:
        lo, hi = t - late - window, t - late
        stats = [s for s in quality_stats((j for j in joined if lo <= j.ts < hi), lo, hi)]
        out.extend((t, s) for s in stats if s.arm == "all")
        t += minute
    reference = out[0][1] if out else None
    return out, reference


HOLD_MINUTES = 5.0
"""The alert rules' ``for: 5m``: a condition pages once it has held this long."""


def simulate(args: argparse.Namespace, scenario: str, base: Path, prefix: str) -> Path:
    """One scenario against its own server; the logs and ``run.json`` stay in the work dir."""
    work = base / scenario
    work.mkdir(parents=True)
    minutes = args.none_minutes if scenario == "none" else args.minutes
    onset = minutes + 1 if scenario == "none" else args.onset_minutes
    world = load_simulated_world(args.artifacts, "", prefix)
    server, target = serve(args, work, prefix)
    try:
        settings = SimulateSettings(
            target=target, minutes=minutes, users=args.users, scenario=scenario,
            onset_minutes=min(onset, minutes), speed=args.speed, seed=args.seed,
            rate=args.rate, concurrency=args.concurrency, outcomes=work / "outcomes",
            artifacts=args.artifacts, control_prefix=prefix, feature_store=args.redis,
        )  # fmt: skip
        start = time.time()
        report = asyncio.run(Simulation(settings, world).run())
    finally:
        server.send_signal(signal.SIGTERM)  # drains, flushes the exposure log and summaries
        server.wait(timeout=120)
    run = {"scenario": scenario, "start": start, "minutes": minutes, "onset": onset,
           "speed": args.speed, "requests": report.requests}  # fmt: skip
    (work / "run.json").write_text(json.dumps(run))
    return work


def first_exposure_ts(work: Path) -> float:
    for _p, _n, record in iter_log_lines(work / "exposures"):
        return float(record["ts"])
    raise ValueError(f"{work}: no exposure record")


def fired(series: list[tuple[float, bool]], hold: float) -> float | None:
    """When a condition sampled at ``series`` (time, held) first held for ``hold`` minutes."""
    since: float | None = None
    for t, held in series:
        if not held:
            since = None
            continue
        since = t if since is None else since
        if t - since >= hold:
            return t
    return None


def judge(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """What the monitor flagged in a kept run, and when, in simulated minutes."""
    path = work / "run.json"
    if path.exists():
        run = json.loads(path.read_text())
    else:  # a run kept from before run.json: its start is its first request
        minutes = args.none_minutes if work.name == "none" else args.minutes
        run = {"scenario": work.name, "start": first_exposure_ts(work), "minutes": minutes,
               "onset": minutes + 1 if work.name == "none" else args.onset_minutes,
               "speed": args.speed, "requests": None}  # fmt: skip
    start, onset, speed = float(run["start"]), float(run["onset"]), float(run["speed"])

    def sim_minute(ts: float) -> float:
        return float(round((ts - start) * speed / 60, 2))

    monitor_dir = work / "exposures" / "monitor"
    drift = sorted(iter_summaries(monitor_dir, kind="drift"), key=lambda r: r["ts"])
    # Every condition ever met, sampled at every summary of its (version, arm).
    conditions: dict[str, list[tuple[float, bool]]] = {}
    met_by_record = [({(f.alert, f.feature) for f in window_flags(r)}, r) for r in drift]
    names = {
        (r["model_version"], r["arm"], alert, feature)
        for met, r in met_by_record
        for alert, feature in met
    }
    for version, arm, alert, feature in sorted(names):
        conditions[f"{alert}:{feature}:{arm}"] = [
            (sim_minute(r["ts"]), (alert, feature) in met)
            for met, r in met_by_record
            if (r["model_version"], r["arm"]) == (version, arm)
        ]
    judged = [r for r in drift if r["requests"] >= 1000 and r.get("reference_start") is not None]
    exposures = (record for _p, _n, record in iter_log_lines(work / "exposures"))
    late_seconds = args.late_minutes * 60 / speed
    joined = [
        j
        for j in join_outcomes(
            exposures, iter_outcomes(work / "outcomes"), late_seconds=late_seconds
        )
        if j.complete
    ]
    evaluations, reference = quality_evaluations(joined, start, args)
    if not any(True for _ in iter_summaries(monitor_dir, kind="quality")):  # once per run
        SummaryLog(monitor_dir).append(quality_record(s, t) for t, s in evaluations)
    if reference is not None:
        for metric in ("ctr", "order_rate", "ndcg"):
            conditions[f"QualityDrop:{metric}"] = [
                (sim_minute(t), metric in quality_drops(s, reference)) for t, s in evaluations
            ]
    flagged: dict[str, float] = {}
    paged: dict[str, float] = {}
    false_alarms: list[str] = []
    pending_before_onset: list[str] = []
    for name, series in conditions.items():
        held = [t for t, ok in series if ok]
        before = [t for t in held if t < onset]
        if before:
            pending_before_onset.append(f"{name}@{before[0]}")
        after = [t for t in held if t >= onset]
        if after:
            flagged[name] = after[0]
        at = fired(series, HOLD_MINUTES)
        if at is not None and at < onset:
            false_alarms.append(f"{name}@{at}")
        elif at is not None:
            paged[name] = at
    window_minutes = args.window_minutes

    def since_onset(found: dict[str, float]) -> dict[str, float]:
        return {k: round(v - onset, 2) for k, v in sorted(found.items(), key=lambda kv: kv[1])}

    return {
        "scenario": run["scenario"],
        "simulated_minutes": run["minutes"],
        "onset_minute": None if run["scenario"] == "none" else onset,
        "requests": run["requests"],
        "flagged": since_onset(flagged),
        "fired": since_onset(paged),
        "minutes_to_first_flag": round(min(flagged.values()) - onset, 2) if flagged else None,
        "minutes_to_first_alert": round(min(paged.values()) - onset, 2) if paged else None,
        "false_alarms": len(false_alarms),
        "false_alarm_examples": false_alarms[:5],
        "conditions_met_before_onset": pending_before_onset[:5],
        "drift_windows_judged": len(
            {round(sim_minute(r["ts"]) / window_minutes) for r in judged if r["arm"] == "all"}
        ),
        "quality_windows_judged": len(
            {round(sim_minute(t) / window_minutes) for t, _ in evaluations}
        ),
        "reference_ctr": None if reference is None else round(reference.ctr, 4),
        "load": [round(x, 2) for x in os.getloadavg()],
        "work": str(work),
    }


def screenshot(index: Path, png: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("chromium not installed: no screenshot", file=sys.stderr)
        return
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", f"--user-data-dir={profile}", "--window-size=1200,1900",
                f"--screenshot={png}", index.as_uri(),
            ],
            capture_output=True,
            timeout=120,
            check=True,
        )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, help="default: all")
    parser.add_argument("--speed", type=float, default=8.0, help="simulated s per wall s")
    parser.add_argument("--rate", type=float, default=100.0, help="sessions per wall s at peak")
    parser.add_argument("--concurrency", type=int, default=256, help="sessions at once")
    parser.add_argument("--users", type=int, default=1500)
    parser.add_argument("--window-minutes", type=float, default=5.0, help="simulated")
    parser.add_argument("--onset-minutes", type=float, default=15.0, help="simulated")
    parser.add_argument("--minutes", type=float, default=28.0, help="simulated, per scenario")
    parser.add_argument("--none-minutes", type=float, default=115.0, help="simulated, control")
    parser.add_argument("--late-minutes", type=float, default=2.0, help="clicks allowed late")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--work", type=Path, help="keep the logs here (default: a temp dir)")
    parser.add_argument("--report-dir", type=Path, help="HTML report + screenshot of one run")
    parser.add_argument("--report-scenario", default="broken-feature", choices=SCENARIOS)
    parser.add_argument(
        "--judge-only", action="store_true", help="judge the runs kept in --work, no new run"
    )
    args = parser.parse_args()
    prefix = f"bench-drift-{uuid.uuid4().hex[:12]}:"
    base = args.work or Path(tempfile.mkdtemp(prefix="bench-drift-"))
    subprocess.run(
        ["true"] if args.judge_only else
        [sys.executable, "-m", "recsys.cli.main", "features", "publish", "--artifacts",
         str(args.artifacts), "--feature-store", args.redis, "--control-prefix", prefix],
        check=True, capture_output=True,
    )  # fmt: skip
    results = []
    try:
        for scenario in args.scenario or SCENARIOS:
            work = base / scenario if args.judge_only else simulate(args, scenario, base, prefix)
            result = judge(args, work)
            print(json.dumps(result), flush=True)
            results.append(result)
    finally:
        client = redis.Redis.from_url(args.redis)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    injected = [r for r in results if r["scenario"] != "none"]
    summary = {
        "flagged_within_10_minutes": sum(
            1
            for r in injected
            if r["minutes_to_first_flag"] is not None and r["minutes_to_first_flag"] <= 10
        ),
        "alerted_within_10_minutes": sum(
            1
            for r in injected
            if r["minutes_to_first_alert"] is not None and r["minutes_to_first_alert"] <= 10
        ),
        "injected": len(injected),
        "false_alarms": sum(r["false_alarms"] for r in results),
        "none_windows_judged": next(
            (
                min(r["drift_windows_judged"], r["quality_windows_judged"])
                for r in results
                if r["scenario"] == "none"
            ),
            0,
        ),
        "speed": args.speed,
        "load": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(summary))
    if args.report_dir is not None:
        chosen = base / args.report_scenario / "exposures" / "monitor"
        if chosen.is_dir():
            files = write_report(
                iter_summaries(chosen),
                args.report_dir,
                title=f"Is the model still good? ({args.report_scenario})",
            )
            screenshot(files.index, args.report_dir / "screenshot.png")
            print(f"report: {files.index}")


if __name__ == "__main__":
    main()
