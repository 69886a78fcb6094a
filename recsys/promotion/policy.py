"""The promotion policy: what a challenger must show before it takes traffic, and how a canary is
judged. One TOML file, versioned (``format`` and the operator's ``revision``), validated as a
whole before anything reads it; its content hash goes into every gate report and decision record.

    format = 1
    revision = 3                       # the operator's own version of this policy

    [offline]                          # challenger vs champion on the same held-out sessions
    min_groups = 50                    # a slice with fewer sessions is reported, not gated
    [[offline.check]]
    metric = "ndcg@20"                 # ndcg@20 | ctr@20 | order_rate@20
    slice = "overall"                  # overall | district:* | district:d3 | surface:* |
                                       # surface:home | users:new | users:returning
    max_drop_abs = 0.005               # challenger >= champion - 0.005
    max_drop_rel = 0.02                # challenger >= champion * (1 - 0.02)
    min = 0.0                          # challenger >= 0.0 (an absolute floor)

    [replay]                           # the challenger over logged traffic (recsys/replay.py)
    min_requests = 20
    max_changed_share = 0.9            # share of the served top-k it would change
    max_abs_score_shift = 10.0         # |mean served score, challenger - logged|

    [infra]                            # in this process, before any server loads it
    latency_budget_us = 200.0          # µs per row on a warm-up batch
    memory_budget_mb = 64.0            # model file and compiled binary

    [canary]                           # see promotion/sequential.py and promotion/canary.py
    metric = "order_rate"              # order_rate | ctr (per request: any order / any click)
    alpha = 0.05                       # false-promotion / false-rollback bound, each
    margin = 0.05                      # non-inferiority margin, relative to the champion's rate
    ramp = [5, 25, 50, 100]            # percent of users per step (by user hash)
    min_requests_per_step = 400        # canary requests at a step before it may ramp
    max_error_rate = 0.01              # guardrails: any breach rolls back at once
    max_p99_ms = 250.0
    max_score_psi = 0.25               # canary's served scores, later vs earlier half

A bad value is refused with one line naming the field (``offline.check[2].max_drop_rel:
expected a number in [0, 1), got 1.5``); unknown keys are refused too, so a typo does not
silently disable a gate.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POLICY_FORMAT = 1
METRICS = ("ndcg@20", "ctr@20", "order_rate@20")
CANARY_METRICS = ("order_rate", "ctr")
_SLICE = re.compile(
    r"^(overall|users:(new|returning)|(district|surface):(\*|[A-Za-z0-9_.-]{1,64}))$"
)


class PolicyError(ValueError):
    """The policy file is invalid; the message names the field and what was expected."""


@dataclass(frozen=True)
class OfflineCheck:
    metric: str
    slice: str
    max_drop_abs: float | None = None
    max_drop_rel: float | None = None
    min: float | None = None

    def describe(self) -> str:
        parts = []
        if self.max_drop_abs is not None:
            parts.append(f"drop <= {self.max_drop_abs:g}")
        if self.max_drop_rel is not None:
            parts.append(f"drop <= {self.max_drop_rel:.1%}")
        if self.min is not None:
            parts.append(f">= {self.min:g}")
        return ", ".join(parts)

    def failures(self, champion: float, challenger: float) -> list[str]:
        """Which limits ``challenger`` breaks against ``champion`` (empty: it passes)."""
        out = []
        if math.isnan(challenger):
            return ["challenger undefined"]
        if self.min is not None and challenger < self.min:
            out.append(f"below the floor {self.min:g}")
        if math.isnan(champion):
            return out
        drop = champion - challenger
        if self.max_drop_abs is not None and drop > self.max_drop_abs:
            out.append(f"drop {drop:.4f} > {self.max_drop_abs:g}")
        if self.max_drop_rel is not None and champion > 0 and drop / champion > self.max_drop_rel:
            out.append(f"drop {drop / champion:.1%} > {self.max_drop_rel:.1%}")
        return out


@dataclass(frozen=True)
class OfflinePolicy:
    min_groups: int = 50
    checks: tuple[OfflineCheck, ...] = (
        OfflineCheck("ndcg@20", "overall", max_drop_abs=0.005, max_drop_rel=0.02),
        OfflineCheck("ctr@20", "overall", max_drop_rel=0.05),
        OfflineCheck("ndcg@20", "district:*", max_drop_rel=0.10),
        OfflineCheck("ndcg@20", "surface:*", max_drop_rel=0.05),
        OfflineCheck("ndcg@20", "users:new", max_drop_rel=0.10),
    )


@dataclass(frozen=True)
class ReplayPolicy:
    min_requests: int = 20
    max_changed_share: float = 0.95
    max_abs_score_shift: float = 10.0


@dataclass(frozen=True)
class InfraPolicy:
    latency_budget_us: float = 200.0
    memory_budget_mb: float = 64.0


@dataclass(frozen=True)
class CanaryPolicy:
    metric: str = "order_rate"
    """Per request (the unit the test needs independent): an order, or a click. The demo
    world's users click in nearly nine requests of ten, so any-click barely moves; orders do."""
    alpha: float = 0.05
    margin: float = 0.05
    ramp: tuple[float, ...] = (5.0, 25.0, 50.0, 100.0)
    min_requests_per_step: int = 400
    max_error_rate: float = 0.01
    max_p99_ms: float = 250.0
    max_score_psi: float = 0.25


@dataclass(frozen=True)
class Policy:
    revision: int = 0
    offline: OfflinePolicy = field(default_factory=OfflinePolicy)
    replay: ReplayPolicy = field(default_factory=ReplayPolicy)
    infra: InfraPolicy = field(default_factory=InfraPolicy)
    canary: CanaryPolicy = field(default_factory=CanaryPolicy)
    source: str = "built-in default"
    content_hash: str = "default"

    def label(self) -> str:
        return f"policy {self.source} revision {self.revision} ({self.content_hash[:12]})"


def load_policy(path: Path | None) -> Policy:
    """The policy in ``path`` (validated), or the built-in default when ``path`` is None."""
    if path is None:
        return Policy()
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise PolicyError(f"--policy {path}: cannot read it ({e.strerror or e})") from e
    try:
        doc = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise PolicyError(f"{path}: not a TOML file ({e})") from e
    try:
        policy = parse_policy(doc)
    except PolicyError as e:
        raise PolicyError(f"{path}: {e}") from e
    return Policy(
        revision=policy.revision,
        offline=policy.offline,
        replay=policy.replay,
        infra=policy.infra,
        canary=policy.canary,
        source=str(path),
        content_hash=hashlib.sha256(raw).hexdigest(),
    )


def parse_policy(doc: Mapping[str, Any]) -> Policy:
    """Validate a parsed policy document; raises :class:`PolicyError` naming the field."""
    _known(doc, "", {"format", "revision", "offline", "replay", "infra", "canary"})
    fmt = doc.get("format")
    if fmt != POLICY_FORMAT:
        raise PolicyError(f"format: expected {POLICY_FORMAT}, got {fmt!r}")
    revision = _int(doc, "revision", "", low=0, default=0)
    offline = _table(doc, "offline")
    replay = _table(doc, "replay")
    infra = _table(doc, "infra")
    canary = _table(doc, "canary")
    return Policy(
        revision=revision,
        offline=_offline(offline),
        replay=_replay(replay),
        infra=_infra(infra),
        canary=_canary(canary),
    )


def _offline(t: Mapping[str, Any]) -> OfflinePolicy:
    _known(t, "offline.", {"min_groups", "check"})
    default = OfflinePolicy()
    raw_checks = t.get("check")
    if raw_checks is None:
        checks = default.checks
    else:
        if not isinstance(raw_checks, list) or not raw_checks:
            raise PolicyError(
                "offline.check: expected a non-empty array of tables [[offline.check]]"
            )
        checks = tuple(_check(c, f"offline.check[{i}]") for i, c in enumerate(raw_checks))
    return OfflinePolicy(
        min_groups=_int(t, "min_groups", "offline.", low=1, default=default.min_groups),
        checks=checks,
    )


def _check(c: Any, where: str) -> OfflineCheck:
    if not isinstance(c, Mapping):
        raise PolicyError(f"{where}: expected a table")
    _known(c, f"{where}.", {"metric", "slice", "max_drop_abs", "max_drop_rel", "min"})
    metric = c.get("metric")
    if metric not in METRICS:
        raise PolicyError(f"{where}.metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    slice_ = c.get("slice", "overall")
    if not isinstance(slice_, str) or not _SLICE.fullmatch(slice_):
        raise PolicyError(
            f"{where}.slice: expected overall, users:new, users:returning, district:<id|*> or "
            f"surface:<name|*>, got {slice_!r}"
        )
    check = OfflineCheck(
        metric=metric,
        slice=slice_,
        max_drop_abs=_float(c, "max_drop_abs", f"{where}.", low=0.0, high=1.0),
        max_drop_rel=_float(c, "max_drop_rel", f"{where}.", low=0.0, high=1.0, high_open=True),
        min=_float(c, "min", f"{where}.", low=0.0, high=1.0),
    )
    if check.max_drop_abs is None and check.max_drop_rel is None and check.min is None:
        raise PolicyError(f"{where}: expected at least one of max_drop_abs, max_drop_rel, min")
    return check


def _replay(t: Mapping[str, Any]) -> ReplayPolicy:
    _known(t, "replay.", {"min_requests", "max_changed_share", "max_abs_score_shift"})
    d = ReplayPolicy()
    return ReplayPolicy(
        min_requests=_int(t, "min_requests", "replay.", low=1, default=d.min_requests),
        max_changed_share=_required(
            _float(t, "max_changed_share", "replay.", low=0.0, high=1.0), d.max_changed_share
        ),
        max_abs_score_shift=_required(
            _float(t, "max_abs_score_shift", "replay.", low=0.0, high=math.inf),
            d.max_abs_score_shift,
        ),
    )


def _infra(t: Mapping[str, Any]) -> InfraPolicy:
    _known(t, "infra.", {"latency_budget_us", "memory_budget_mb"})
    d = InfraPolicy()
    return InfraPolicy(
        latency_budget_us=_required(
            _float(t, "latency_budget_us", "infra.", low=0.0, high=math.inf, low_open=True),
            d.latency_budget_us,
        ),
        memory_budget_mb=_required(
            _float(t, "memory_budget_mb", "infra.", low=0.0, high=math.inf, low_open=True),
            d.memory_budget_mb,
        ),
    )


def _canary(t: Mapping[str, Any]) -> CanaryPolicy:
    keys = {
        "metric",
        "alpha",
        "margin",
        "ramp",
        "min_requests_per_step",
        "max_error_rate",
        "max_p99_ms",
        "max_score_psi",
    }
    _known(t, "canary.", keys)
    d = CanaryPolicy()
    metric = t.get("metric", d.metric)
    if metric not in CANARY_METRICS:
        raise PolicyError(
            f"canary.metric: expected one of {', '.join(CANARY_METRICS)}, got {metric!r}"
        )
    ramp = t.get("ramp", list(d.ramp))
    if (
        not isinstance(ramp, list)
        or not ramp
        or not all(isinstance(p, int | float) and not isinstance(p, bool) for p in ramp)
        or not all(0 < p <= 100 for p in ramp)
        or any(b <= a for a, b in itertools.pairwise(ramp))
        or ramp[-1] != 100
    ):
        raise PolicyError(
            f"canary.ramp: expected increasing percents in (0, 100] ending at 100, got {ramp!r}"
        )
    return CanaryPolicy(
        metric=metric,
        alpha=_required(_float(t, "alpha", "canary.", low=0.0, high=0.5, low_open=True), d.alpha),
        margin=_required(
            _float(t, "margin", "canary.", low=0.0, high=1.0, low_open=True, high_open=True),
            d.margin,
        ),
        ramp=tuple(float(p) for p in ramp),
        min_requests_per_step=_int(
            t, "min_requests_per_step", "canary.", low=1, default=d.min_requests_per_step
        ),
        max_error_rate=_required(
            _float(t, "max_error_rate", "canary.", low=0.0, high=1.0), d.max_error_rate
        ),
        max_p99_ms=_required(
            _float(t, "max_p99_ms", "canary.", low=0.0, high=math.inf, low_open=True),
            d.max_p99_ms,
        ),
        max_score_psi=_required(
            _float(t, "max_score_psi", "canary.", low=0.0, high=math.inf), d.max_score_psi
        ),
    )


# -- field readers -------------------------------------------------------------------------------


def _known(t: Mapping[str, Any], where: str, keys: set[str]) -> None:
    unknown = sorted(set(t) - keys)
    if unknown:
        raise PolicyError(f"{where}{unknown[0]}: unknown field (expected one of {sorted(keys)})")


def _table(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    t = doc.get(key, {})
    if not isinstance(t, Mapping):
        raise PolicyError(f"{key}: expected a table [{key}]")
    return t


def _required(value: float | None, default: float) -> float:
    return default if value is None else value


def _int(t: Mapping[str, Any], key: str, where: str, *, low: int, default: int) -> int:
    value = t.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise PolicyError(f"{where}{key}: expected an integer >= {low}, got {value!r}")
    return value


def _float(
    t: Mapping[str, Any],
    key: str,
    where: str,
    *,
    low: float,
    high: float,
    low_open: bool = False,
    high_open: bool = False,
) -> float | None:
    if key not in t:
        return None
    value = t[key]
    ok = isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        v = float(value)
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        ok = ok and math.isfinite(v)
    if not ok:
        left = "(" if low_open else "["
        right = ")" if high_open or high == math.inf else "]"
        upper = "inf" if high == math.inf else f"{high:g}"
        raise PolicyError(
            f"{where}{key}: expected a number in {left}{low:g}, {upper}{right}, got {value!r}"
        )
    return float(value)
