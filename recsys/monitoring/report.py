"""``recsys monitor report``: a static HTML page a person reads in a browser.

Per model version and arm (the version over all arms first): the live distribution of every
feature and of the score against the training baseline and the live reference, in the
baseline's bins (the latest window); PSI over time against both references; online quality over
time (CTR, order rate, NDCG@20 with their intervals); and the alert conditions the windows met.
The plots are matplotlib figures (Agg backend, no display) written as PNG files beside
``index.html``; the page has no script and no external resource.
"""

from __future__ import annotations

import html
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recsys.monitoring.alerts import DRIFT_PSI, NAN_SHARE, Flag, all_flags
from recsys.monitoring.windows import ALL_ARMS

PSI_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


@dataclass(frozen=True)
class ReportFiles:
    index: Path
    images: tuple[Path, ...]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _key_order(key: tuple[str, str]) -> tuple[str, int, str]:
    return (key[0], 0 if key[1] == ALL_ARMS else 1, key[1])


def _slug(version: str, arm: str) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in f"{version}-{arm}")
    return keep[:80]


def _distributions(plt: Any, latest: Mapping[str, Any], path: Path) -> None:
    columns = latest["columns"]
    names = list(columns)
    cols = 4
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(13, 2.3 * rows), squeeze=False)
    for ax, name in zip(axes.ravel(), names, strict=False):
        c = columns[name]
        expected = np.asarray(c["expected"], dtype=np.float64)
        live = np.asarray(c["live"], dtype=np.float64)
        x = np.arange(expected.size)
        width = 0.4 if not c.get("reference") else 0.28
        ax.bar(
            x - width / 2,
            expected / max(expected.sum(), 1),
            width,
            label="training",
            color="#999999",
        )
        ax.bar(x + width / 2, live / max(live.sum(), 1), width, label="live", color="#1f77b4")
        if c.get("reference"):
            ref = np.asarray(c["reference"], dtype=np.float64)
            ax.step(
                x,
                ref / max(ref.sum(), 1),
                where="mid",
                color="#d62728",
                lw=1,
                label="live reference",
            )
        psi = c.get("psi")
        drift = c.get("drift_psi")
        title = f"{name}  PSI {psi:.2f}" if psi is not None else name
        if drift is not None:
            title += f" / live {drift:.2f}"
        nan = c.get("nan_share") or 0.0
        if nan > 0:
            title += f"  NaN {nan:.0%}"
        alarming = (drift or 0) > DRIFT_PSI or nan > NAN_SHARE
        ax.set_title(title, fontsize=8, color="#d62728" if alarming else "black")
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=6)
    fig.suptitle(
        "share per training-baseline bin (deciles; categories for cuisine/category)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _psi_over_time(plt: Any, records: Sequence[Mapping[str, Any]], path: Path) -> None:
    fig, (live_ax, train_ax) = plt.subplots(1, 2, figsize=(13, 3.2))
    ts = np.array([r["ts"] for r in records])
    start = ts.min()
    minutes = (ts - start) / 60
    names = list(records[-1]["columns"])
    worst = sorted(
        names,
        key=lambda n: -max((r["columns"].get(n, {}).get("drift_psi") or 0.0) for r in records),
    )
    for ax, key, title in (
        (live_ax, "drift_psi", "PSI against the live reference (alerts)"),
        (train_ax, "psi", "PSI against the training baseline"),
    ):
        for name in names:
            values = [r["columns"].get(name, {}).get(key) for r in records]
            y = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
            top = name in worst[:6]
            ax.plot(
                minutes,
                y,
                lw=1.4 if top else 0.6,
                color=PSI_COLOURS[worst.index(name)] if top else "#bbbbbb",
                label=name if top else None,
            )
        ax.axhline(DRIFT_PSI, color="#d62728", ls="--", lw=0.8)
        ax.set_title(title, fontsize=9)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(start))
        ax.set_xlabel(f"minutes since {since} UTC (wall clock)", fontsize=8)
        ax.set_yscale("symlog", linthresh=0.1)
        ax.tick_params(labelsize=7)
    live_ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _quality_over_time(plt: Any, records: Sequence[Mapping[str, Any]], path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(13, 2.8))
    ts = np.array([r["end"] for r in records])
    minutes = (ts - ts.min()) / 60
    for ax, key, title in zip(
        axes, ("ctr", "order", "ndcg"), ("CTR", "order rate", "NDCG@20"), strict=True
    ):
        value = "order_rate" if key == "order" else key

        def col(name: str) -> np.ndarray:
            return np.array([np.nan if r.get(name) is None else r[name] for r in records], float)

        ax.plot(minutes, col(value), color="#1f77b4", marker="o", ms=2)
        ax.fill_between(minutes, col(f"{key}_low"), col(f"{key}_high"), alpha=0.25, color="#1f77b4")
        ax.set_title(f"{title} (95 % interval)", fontsize=9)
        ax.set_xlabel("minutes (wall clock)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _alerts_table(flags: Sequence[Flag]) -> str:
    if not flags:
        return "<p class=ok>No window met an alert condition.</p>"
    firsts: dict[tuple[str, str, str, str], list[Flag]] = defaultdict(list)
    for f in flags:
        firsts[(f.alert, f.model_version, f.arm, f.feature)].append(f)
    rows = []
    for (alert, version, arm, feature), fs in sorted(firsts.items(), key=lambda kv: kv[1][0].ts):
        first = time.strftime("%H:%M:%S", time.gmtime(fs[0].ts))
        worst = max(f.value for f in fs)
        rows.append(
            f"<tr><td>{html.escape(alert)}</td><td>{html.escape(version)}</td>"
            f"<td>{html.escape(arm)}</td><td>{html.escape(feature)}</td><td>{first}</td>"
            f"<td>{len(fs)}</td><td>{worst:.3f}</td></tr>"
        )
    return (
        "<table><tr><th>alert</th><th>model version</th><th>arm</th><th>feature</th>"
        "<th>first window (UTC)</th><th>windows</th><th>worst value</th></tr>"
        + "".join(rows)
        + "</table>"
    )


STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
h3{font-size:14px;color:#555}table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}th{background:#f4f4f4}
.ok{color:#2a7a2a}.bad{color:#b00}img{max-width:100%}.meta{color:#666;font-size:13px}
"""


def write_report(
    records: Iterable[Mapping[str, Any]], out: Path, *, title: str = "Is the model still good?"
) -> ReportFiles:
    """Render the summary ``records`` (drift and quality) into ``out``/index.html + PNGs."""
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    drift: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    quality: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    kept = list(records)
    for r in kept:
        if r.get("type") == "drift":
            drift[(r["model_version"], r["arm"])].append(r)
        elif r.get("type") == "quality":
            quality[(r["model_version"], r["arm"])].append(r)
    flags = all_flags(kept)
    images: list[Path] = []
    sections = []
    for key in sorted(set(drift) | set(quality), key=_key_order):
        version, arm = key
        slug = _slug(version, arm)
        parts = [f"<h2>model {html.escape(version)} · arm {html.escape(arm)}</h2>"]
        windows = sorted(drift.get(key, []), key=lambda r: r["ts"])
        if windows:
            # The latest window with at least half the busiest one's requests (the very last
            # summary may hold only the drain's few requests).
            busiest = max(int(r.get("requests", 0)) for r in windows)
            latest = [r for r in windows if int(r.get("requests", 0)) * 2 >= busiest][-1]
            own = [f for f in flags if (f.model_version, f.arm) == key]
            met = len({(f.alert, f.feature) for f in own})
            status = (
                f"<span class=bad>{met} alert condition(s) met</span>"
                if own
                else "<span class=ok>no alert condition met</span>"
            )
            parts.append(
                f"<p class=meta>{len(windows)} windows; plotted: {latest['requests']} requests, "
                f"{latest['rows']} served items; {status}</p>"
            )
            dist = out / f"{slug}-distributions.png"
            _distributions(plt, latest, dist)
            psi = out / f"{slug}-psi.png"
            _psi_over_time(plt, windows, psi)
            images += [dist, psi]
            parts.append("<h3>Live against training and the live reference, one recent window</h3>")
            parts.append(f'<img src="{dist.name}" alt="distributions">')
            parts.append("<h3>PSI over time</h3>")
            parts.append(f'<img src="{psi.name}" alt="PSI over time">')
        qs = sorted(quality.get(key, []), key=lambda r: r["end"])
        if qs:
            q = out / f"{slug}-quality.png"
            _quality_over_time(plt, qs, q)
            images.append(q)
            parts.append("<h3>Online quality over time</h3>")
            parts.append(f'<img src="{q.name}" alt="online quality">')
        sections.append("\n".join(parts))
    generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    body = (
        f"<h1>{html.escape(title)}</h1><p class=meta>generated {generated} from "
        f"{sum(map(len, drift.values()))} drift and {sum(map(len, quality.values()))} quality "
        "window summaries. PSI &gt; 0.2 against the live reference with ≥ 1000 requests is "
        "drift (docs/monitoring.md).</p><h2>Alerts that fired</h2>"
        + _alerts_table(flags)
        + "".join(sections)
    )
    index = out / "index.html"
    index.write_text(
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{body}</body></html>"
    )
    return ReportFiles(index, tuple(images))
