"""Request-scoped types every stage speaks: assign -> retrieve -> rank -> arrange -> respond.

The stages themselves pass these values inside a :class:`recsys.stage.Batch`. Nothing here knows
about gRPC or Prometheus; the server adapts to and from these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

Float32Array = npt.NDArray[np.float32]
Float64Array = npt.NDArray[np.float64]
Int64Array = npt.NDArray[np.int64]
Int32Array = npt.NDArray[np.int32]
BoolArray = npt.NDArray[np.bool_]

DEFAULT_NUM_RESULTS = 20
MAX_NUM_RESULTS = 200
MAX_USER_ID_BYTES = 128
DEFAULT_SURFACE = "home"


@dataclass(frozen=True, slots=True)
class Location:
    lat: float
    lon: float


@dataclass(frozen=True, slots=True)
class Request:
    """A validated Recommend request (see serving/validation.py for the checks)."""

    request_id: str
    user_id: str
    num_results: int
    location: Location | None = None
    surface: str = DEFAULT_SURFACE
    platform: str = ""
    exclude_sku_ids: tuple[int, ...] = ()
    hour: int = 12
    """Local hour of day (0-23) the feed is shown at; a ranking feature."""


@dataclass(frozen=True, slots=True)
class Exposure:
    """The user's experiment and arm in one layer (only layers with a running experiment)."""

    layer: str
    experiment: str
    arm: str
    bucket: int
    forced: bool = False


@dataclass(frozen=True, slots=True)
class PipelineParams:
    """The knobs experiment arms may turn; defaults come from the experiment config.

    ``model_version`` empty means "whatever the routing table says for this user".
    """

    retrieval_k: int = 200
    nprobe: int = 0
    """IVF lists probed; 0 means the index version's default, measured at build to reach the
    recall target."""
    model_name: str = "ranker"
    model_version: str = ""
    max_per_restaurant: int = 2
    radius_km: float = 8.0
    rank_cut: int = 0
    """Two-phase ranking: how many candidates (best by the cheap first phase) the full model
    scores; the rest follow in first-phase order. 0 scores every candidate with the model.
    Measured per cut by benchmarks/bench_rank_cut.py: with the compiled model a cut of 100
    saves 4-7% of batch CPU at K=200 but keeps only 26-52% of the reference's top 20, so the
    default scores all; an arm may set a cut to trade."""


@dataclass(frozen=True, slots=True)
class Assignment:
    exposures: tuple[Exposure, ...]
    params: PipelineParams
    config_version: str


@dataclass(frozen=True, slots=True)
class Candidates:
    """Retrieval output for one request: item rows and their retrieval scores, best first."""

    sku_ids: Int64Array
    retrieval_scores: Float32Array
    fallback: bool = False
    """True when the user was unknown and candidates are popular items near the location."""


@dataclass(frozen=True, slots=True)
class ScoredItems:
    sku_ids: Int64Array
    restaurant_ids: Int64Array
    scores: Float32Array

    def __len__(self) -> int:
        return int(self.sku_ids.shape[0])


class Encodings:
    """The wire forms of one computed answer, made once and shared by every cache hit on it.

    Filled in the batch's thread (serving/wire.py; otherwise when first needed, by the servicer
    and the exposure writer), so a hit re-serialises nothing: ``response`` is the
    RecommendResponse without its ``request_id`` (field 1, which is serialized first, so a hit
    prefixes its own), ``record`` the exposure line's fields from ``model_version`` on (see
    recsys/serving/record.py).
    """

    __slots__ = ("record", "response", "score_counts")

    def __init__(
        self,
        response: bytes | None = None,
        record: bytes | None = None,
        score_counts: object = None,
    ) -> None:
        self.response = response
        self.record = record
        self.score_counts = score_counts
        """The live score histogram's bucket counts of the served scores (serving/metrics.py)."""


@dataclass(frozen=True, slots=True)
class Recommendation:
    """What Recommend answers, before it is turned into a protobuf response."""

    request_id: str
    items: ScoredItems
    model_version: str
    index_version: str
    config_version: str
    exposures: tuple[Exposure, ...] = ()
    degraded_reasons: tuple[str, ...] = field(default=())
    stage_seconds: tuple[tuple[str, float], ...] = ()
    """Wall time of each stage this request went through (a batched stage counts its batch)."""
    snapshot_id: str = ""
    """The serving snapshot that produced the answer: a content hash over every version it
    depended on (documents, index, features, models, code); its manifest names them all."""
    user_features: Float64Array | None = None
    """The user's feature row as the ranker used it (None for an unknown user)."""
    candidates: ScoredItems | None = None
    """Every ranked candidate with its final score, for the sampled share of requests whose
    record keeps the candidates the user did not see; None otherwise."""
    cached: bool = False
    """Served from the result cache (the answer computed for an earlier request)."""
    computed_for: Request | None = field(default=None, compare=False, repr=False)
    """The request the answer was computed for: this one, or for a cache hit the earlier request
    in the same cache cell whose answer it shares (its location is what a replay must use)."""
    encodings: Encodings | None = field(default=None, compare=False, repr=False)
    """Where the wire forms of this answer are kept once made (None: made per response)."""

    @property
    def degraded(self) -> bool:
        return bool(self.degraded_reasons)

    @property
    def degraded_reason(self) -> str:
        return "; ".join(self.degraded_reasons)


@dataclass(frozen=True)
class ServingVersions:
    """What is serving right now, for info metrics and logs."""

    index_version: str
    config_version: str
    model_versions: dict[str, str] = field(default_factory=dict)
    """model name -> production version."""
