"""Gates a challenger passes before it takes any traffic: offline, replay, infra.

- **offline**: the challenger and the champion score the same held-out sessions
  (:class:`~recsys.promotion.holdout.EvalSet`); per slice (overall, each district, each surface,
  new and returning users) NDCG@20 and two CTR-weighted metrics, ``ctr@20`` and
  ``order_rate@20``: the position-discounted share of the top 20 that was clicked (ordered),
  weights ``1/log2(rank + 2)`` as in DCG. Each policy check bounds the challenger's drop from the
  champion (absolute, relative) and may set a floor. A slice with fewer sessions than
  ``offline.min_groups`` is reported but not gated (its noise would fail good models).
- **replay**: the challenger run over logged requests (recsys/replay.py ``diff_against``): the
  share of the served top-k it would change and the shift of the mean served score.
- **infra**: the serving checks (schema, golden rows, no NaN, latency per row on a warm-up
  batch) with the policy's latency budget, and the model's memory (model file and compiled
  binary) against its budget.

Every check is a :class:`Check` with both numbers and the limit, so a refusal prints the
evidence, and the whole :class:`GateReport` is written into the decision record.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from recsys.promotion.holdout import EvalSet
from recsys.promotion.policy import InfraPolicy, OfflineCheck, Policy, ReplayPolicy
from recsys.ranking.evaluation import DEFAULT_K, ndcg_per_group


@dataclass(frozen=True)
class Check:
    gate: str
    """offline | replay | infra"""
    name: str
    """e.g. ``ndcg@20 district:d3``"""
    champion: float | None
    challenger: float
    limit: str
    passed: bool
    gated: bool = True
    """False: reported only (a slice too small to judge)."""
    note: str = ""

    def line(self) -> str:
        mark = "info" if not self.gated else ("ok  " if self.passed else "FAIL")
        champion = "" if self.champion is None else f"champion {self.champion:.4f}  "
        note = f"  ({self.note})" if self.note else ""
        return (
            f"{mark} {self.gate:7s} {self.name:28s} {champion}"
            f"challenger {self.challenger:.4f}  [{self.limit}]{note}"
        )


@dataclass(frozen=True)
class GateReport:
    name: str
    version: str
    champion: str
    policy: str
    checks: tuple[Check, ...]
    data: Mapping[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed or not c.gated for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.gated and not c.passed]

    def summary(self) -> str:
        who = f"{self.name}/{self.version}"
        if self.passed:
            return f"{who} passed {len(self.checks)} gate checks vs {self.champion}"
        failed = "; ".join(f"{c.gate} {c.name}: {c.note}" for c in self.failures)
        return f"{who} failed {len(self.failures)} gate check(s) vs {self.champion}: {failed}"

    def lines(self) -> list[str]:
        held_out = self.data.get("held_out", {}).get("description", "")
        return [
            self.summary(),
            f"  {self.policy}",
            *([f"  held-out data: {held_out}"] if held_out else []),
            *(f"  {c.line()}" for c in self.checks),
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "champion": self.champion,
            "policy": self.policy,
            "passed": self.passed,
            "checks": [asdict(c) for c in self.checks],
            "data": dict(self.data),
        }


# -- offline -------------------------------------------------------------------------------------


def discounted_rate_per_group(
    hits: npt.ArrayLike,
    scores: npt.ArrayLike,
    group_sizes: npt.NDArray[np.int64],
    k: int = DEFAULT_K,
) -> npt.NDArray[np.float64]:
    """Per group: sum over the top ``k`` by score of ``hit * 1/log2(rank+2)``, divided by the
    sum of those weights (ties broken pessimistically: the non-hit first)."""
    h = np.asarray(hits, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    n_groups = group_sizes.shape[0]
    group = np.repeat(np.arange(n_groups, dtype=np.int64), group_sizes)
    order = np.lexsort((h, -s, group))
    starts = np.cumsum(group_sizes) - group_sizes
    rank = np.arange(h.shape[0]) - starts[group[order]]
    weight = np.where(rank < k, 1.0 / np.log2(rank + 2.0), 0.0)
    hit_weight = np.bincount(group[order], weights=h[order] * weight, minlength=n_groups)
    total = np.bincount(group[order], weights=weight, minlength=n_groups)
    out = np.full(n_groups, np.nan)
    np.divide(hit_weight, total, out=out, where=total > 0)
    return out


def group_metrics(
    eval_set: EvalSet, scores: npt.NDArray[np.floating[Any]]
) -> dict[str, npt.NDArray[np.float64]]:
    """Per group: ndcg@20 (NaN without a click), ctr@20 and order_rate@20."""
    labels = eval_set.labels
    return {
        "ndcg@20": ndcg_per_group(labels, scores, group_sizes=eval_set.group_sizes, k=DEFAULT_K),
        "ctr@20": discounted_rate_per_group(labels >= 1, scores, eval_set.group_sizes),
        "order_rate@20": discounted_rate_per_group(labels >= 2, scores, eval_set.group_sizes),
    }


def slice_means(
    eval_set: EvalSet, per_group: Mapping[str, npt.NDArray[np.float64]]
) -> dict[str, dict[str, tuple[float, int]]]:
    """slice -> metric -> (mean over the slice's groups where defined, number of such groups)."""
    out: dict[str, dict[str, tuple[float, int]]] = {}
    for name, mask in eval_set.slices().items():
        out[name] = {}
        for metric, values in per_group.items():
            v = values[mask]
            v = v[~np.isnan(v)]
            out[name][metric] = (float(v.mean()) if v.size else math.nan, int(v.size))
    return out


def _matching(slices: Iterable[str], pattern: str) -> list[str]:
    if pattern.endswith(":*"):
        prefix = pattern[:-1]
        return sorted(s for s in slices if s.startswith(prefix))
    return [pattern] if pattern in slices else []


def offline_checks(
    eval_set: EvalSet,
    champion_scores: npt.NDArray[np.floating[Any]],
    challenger_scores: npt.NDArray[np.floating[Any]],
    checks: Iterable[OfflineCheck],
    min_groups: int,
) -> list[Check]:
    champion = slice_means(eval_set, group_metrics(eval_set, champion_scores))
    challenger = slice_means(eval_set, group_metrics(eval_set, challenger_scores))
    out = []
    for rule in checks:
        names = _matching(champion, rule.slice)
        if not names:
            out.append(
                Check(
                    "offline",
                    f"{rule.metric} {rule.slice}",
                    None,
                    math.nan,
                    rule.describe(),
                    passed=True,
                    gated=False,
                    note="no such slice in the held-out data",
                )
            )
        for name in names:
            a, n = champion[name][rule.metric]
            b, _ = challenger[name][rule.metric]
            failures = rule.failures(a, b)
            small = n < min_groups
            out.append(
                Check(
                    "offline",
                    f"{rule.metric} {name}",
                    a,
                    b,
                    rule.describe(),
                    passed=not failures,
                    gated=not small,
                    note="; ".join(
                        [*failures, *([f"{n} sessions < min_groups {min_groups}"] if small else [])]
                    ),
                )
            )
    return out


# -- replay --------------------------------------------------------------------------------------


def replay_checks(
    diff: Mapping[str, Mapping[str, Mapping[str, float]]] | None, policy: ReplayPolicy
) -> list[Check]:
    """Checks on ``diff_against``'s overall summary (None: no logged traffic to replay)."""
    overall = (diff or {}).get("overall", {}).get("all")
    requests = int(overall["requests"]) if overall else 0
    if overall is None or requests < policy.min_requests:
        return [
            Check(
                "replay",
                "requests",
                None,
                float(requests),
                f">= {policy.min_requests}",
                passed=True,
                gated=False,
                note="not enough logged requests to replay; the replay gate did not run",
            )
        ]
    changed = float(overall["changed_share"])
    shift = float(overall["mean_score_shift"])
    return [
        Check(
            "replay",
            "changed top-k share",
            None,
            changed,
            f"<= {policy.max_changed_share:g}",
            passed=changed <= policy.max_changed_share,
            note=""
            if changed <= policy.max_changed_share
            else f"{changed:.3f} > {policy.max_changed_share:g}",
        ),
        Check(
            "replay",
            "mean score shift",
            None,
            shift,
            f"|shift| <= {policy.max_abs_score_shift:g}",
            passed=abs(shift) <= policy.max_abs_score_shift,
            note=""
            if abs(shift) <= policy.max_abs_score_shift
            else f"|{shift:.3f}| > {policy.max_abs_score_shift:g}",
        ),
        Check(
            "replay",
            "requests replayed",
            None,
            float(requests),
            f">= {policy.min_requests}",
            passed=True,
        ),
    ]


# -- infra ---------------------------------------------------------------------------------------


def model_megabytes(model_dir: Path, compiled_dir: Path) -> float:
    """The model's footprint: its files and its compiled binaries, in MB."""
    total = 0
    for directory in (model_dir, compiled_dir):
        if directory.is_dir():
            total += sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    return total / 1e6


def infra_checks(
    validation_error: str, per_row_us: float, megabytes: float, policy: InfraPolicy
) -> list[Check]:
    return [
        Check(
            "infra",
            "schema, golden rows, no NaN",
            None,
            0.0 if validation_error else 1.0,
            "loads as served",
            passed=not validation_error,
            note=validation_error,
        ),
        Check(
            "infra",
            "latency µs per row",
            None,
            per_row_us,
            f"<= {policy.latency_budget_us:g}",
            passed=per_row_us <= policy.latency_budget_us,
            note="" if per_row_us <= policy.latency_budget_us else "over the budget",
        ),
        Check(
            "infra",
            "memory MB",
            None,
            megabytes,
            f"<= {policy.memory_budget_mb:g}",
            passed=megabytes <= policy.memory_budget_mb,
            note="" if megabytes <= policy.memory_budget_mb else "over the budget",
        ),
    ]


def report(
    name: str,
    version: str,
    champion: str,
    policy: Policy,
    checks: Iterable[Check],
    data: Mapping[str, Any],
) -> GateReport:
    return GateReport(name, version, champion, policy.label(), tuple(checks), data)
