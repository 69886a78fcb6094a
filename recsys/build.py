"""`recsys build`: the demo world and every artifact serving needs, in one command.

world -> learned vectors and feature tables -> FAISS index -> LightGBM ranker -> control
documents (routing to the new versions, default experiments, empty availability). Each artifact
is a content-addressed version with a manifest, so the same seed gives the same version ids.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from recsys import artifacts
from recsys.artifacts import ArtifactRoot
from recsys.settings import BuildSettings

if TYPE_CHECKING:
    import faiss

    from recsys.ranking.features import FeatureTables
    from recsys.retrieval.index import FilteredRecall
    from recsys.types import Int64Array
    from recsys.world import World

Progress = Callable[[str], None]
INDEX_TARGET_RECALL = 0.95
INDEX_RECALL_K = 500
"""The index's default nprobe is the smallest that reaches INDEX_TARGET_RECALL at this depth
(recall@500 against exact search, on probe queries drawn from the real user vectors), and that
reaches it with the delivery filter too (:func:`_recall_under_filter`)."""


@dataclass
class BuildReport:
    world_version: str = ""
    features_version: str = ""
    index_version: str = ""
    model_version: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    offline_metrics: dict[str, float] = field(default_factory=dict)
    index_recall: float = 0.0
    index_filtered_recall: float | None = None
    """recall@K of the retrieve stage with the delivery filter at the default nprobe (None: not
    measured, an exact flat index)."""
    index_filtered_recall_by_k: dict[int, float] = field(default_factory=dict)
    """The same at every depth K the default experiments serve (:func:`served_depths`), the
    served K first, each at its own nprobe (:attr:`index_nprobe_by_k`)."""
    index_nlist: int = 0
    index_nprobe: int = 0
    index_nprobe_by_k: dict[int, int] = field(default_factory=dict)
    """The nprobe a search of each served depth K uses (the smallest that reaches the target
    there)."""
    bytes_on_disk: int = 0
    peak_rss_mb: float = 0.0


STAGES = ("world", "vectors", "index", "ranker", "control")


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


@contextmanager
def _stage(name: str, report: BuildReport, say: Progress, bar: Any = None) -> Iterator[None]:
    say(f"[{name}] ...")
    start = time.perf_counter()
    yield
    took = time.perf_counter() - start
    report.seconds[name] = round(took, 2)
    say(f"[{name}] done in {took:.1f}s, peak RSS {peak_rss_mb():,.0f} MB")
    if bar is not None:
        bar.update(1)


def build(settings: BuildSettings, say: Progress = print) -> BuildReport:
    root = ArtifactRoot(settings.out)
    report = BuildReport()
    total = time.perf_counter()
    progress = say if settings.progress else None
    with _progress_bar(settings.progress, len(STAGES), "build", "stage") as bar:
        _build_stages(settings, root, report, say, progress, bar)
    report.seconds["total"] = round(time.perf_counter() - total, 2)
    report.bytes_on_disk = sum(
        p.stat().st_size for p in root.path.rglob("*") if p.is_file() and "control" not in p.parts
    )
    report.peak_rss_mb = peak_rss_mb()
    return report


@contextmanager
def _progress_bar(enabled: bool, total: int, desc: str, unit: str) -> Iterator[Any]:
    """A tqdm bar on stderr (None when progress is off, e.g. in tests)."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True) as bar:
        yield bar


def _build_stages(
    settings: BuildSettings,
    root: ArtifactRoot,
    report: BuildReport,
    say: Progress,
    progress: Progress | None,
    bar: Any,
) -> None:
    # Imported here: the CLI's --help must not pay for FAISS and LightGBM.
    from recsys.ranking.features import build_feature_tables, save_feature_tables
    from recsys.ranking.model import save_model_version
    from recsys.ranking.registry import load_for_serving
    from recsys.ranking.training import RankerParams, train_ranker
    from recsys.retrieval.embeddings import learn_embeddings
    from recsys.retrieval.index import build_index, save_index_version
    from recsys.world import save_world
    from recsys.worldgen import generate_world

    with _stage("world", report, say, bar):
        world = generate_world(settings.skus, settings.users, settings.seed, progress=progress)
        with artifacts.staging(root.path) as tmp:
            save_world(world, tmp)
            report.world_version, _ = artifacts.publish(
                tmp,
                root.world,
                {"kind": "world", "seed": settings.seed, "skus": settings.skus,
                 "users": settings.users, "log_rows": world.log.n_rows},
            )  # fmt: skip
    say(
        f"  {world.catalogue.n_restaurants:,} restaurants, {world.catalogue.n_items:,} SKUs, "
        f"{world.users.n_users:,} users, {world.log.n_rows:,} impressions"
    )

    with _stage("vectors", report, say, bar):
        emb = learn_embeddings(world, settings.dim, settings.seed, progress=progress)
        tables = build_feature_tables(world, emb.user_vectors, emb.item_vectors)
        with artifacts.staging(root.path) as tmp:
            save_feature_tables(tables, tmp)
            report.features_version, _ = artifacts.publish(
                tmp,
                root.features,
                {"kind": "features", "world_version": report.world_version,
                 "dim": settings.dim, "seed": settings.seed},
            )  # fmt: skip

    with _stage("index", report, say, bar):
        n_items = emb.item_vectors.shape[0]
        with _progress_bar(settings.progress, n_items, "index: add items", "item") as add_bar:
            index = build_index(
                emb.item_vectors,
                seed=settings.seed,
                on_added=None if add_bar is None else add_bar.update,
            )
        rng = np.random.default_rng(settings.seed)
        known = np.flatnonzero(np.abs(emb.user_vectors).sum(axis=1) > 0)
        probe_rows = np.sort(rng.choice(known, size=min(256, known.size), replace=False))
        report.index_version = save_index_version(
            root,
            index,
            emb.item_vectors,
            np.ascontiguousarray(emb.user_vectors[probe_rows]),
            features_version=report.features_version,
            k=INDEX_RECALL_K,
            target_recall=INDEX_TARGET_RECALL,
            filtered=_recall_under_filter(index, world, tables, probe_rows),
        )
        manifest = artifacts.read_manifest(root.indexes / report.index_version)
        report.index_recall = float(manifest.get("recall", 0.0))
        if "filtered_recall" in manifest:
            report.index_filtered_recall = float(manifest["filtered_recall"])
        by_k = manifest.get("filtered_recall_by_k", {})
        report.index_filtered_recall_by_k = {
            int(k): float(v["recall_at_nprobe"]) for k, v in by_k.items()
        }
        report.index_nprobe_by_k = {int(k): int(v["nprobe"]) for k, v in by_k.items()}
        report.index_nlist = int(manifest.get("nlist", 0))
        report.index_nprobe = int(manifest.get("default_nprobe", 0))

    with _stage("ranker", report, say, bar):
        params = RankerParams(seed=settings.seed)
        trained = train_ranker(world, tables, params, progress=progress)
        report.model_version = save_model_version(
            root,
            "ranker",
            trained,
            tables,
            features_version=report.features_version,
            world_version=report.world_version,
            params=params,
        )
        report.offline_metrics = dict(trained.metrics)
        # Validate as a server will, and compile it now (cached under compiled/) so servers
        # on this machine start scoring with native code without compiling.
        _, engine = load_for_serving(root, "ranker", report.model_version)
        say(f"  ranker engine: {engine}")

    with _stage("control", report, say, bar):
        publish_control_documents(root, report)


def publish_control_documents(root: ArtifactRoot, report: BuildReport) -> None:
    """Route serving to the new versions; create default experiments and availability once."""
    from recsys.control.backends import open_store
    from recsys.control.store import AVAILABILITY, EXPERIMENTS, ROUTING
    from recsys.experiments.assignment import default_config

    store = open_store("", root.path)
    try:
        routing = store.read(ROUTING)
        body: dict[str, Any] = {
            "index": report.index_version,
            "models": {"ranker": {"production": report.model_version}},
        }
        if routing is None or routing.body != body:
            store.write(
                ROUTING, body, expected_version=routing.version if routing else 0, author="build"
            )
        if store.read(EXPERIMENTS) is None:
            store.write(EXPERIMENTS, default_config(), expected_version=0, author="build")
        if store.read(AVAILABILITY) is None:
            store.write(
                AVAILABILITY,
                {"skus_off": [], "restaurants_off": []},
                expected_version=0,
                author="build",
            )
    finally:
        store.close()


def is_built(root: Path) -> bool:
    return (root / "control").is_dir() and bool(artifacts.versions(root / "indexes"))


PROBE_PLACE_SPREAD_DEG = 0.01
"""Standard deviation, in degrees of latitude and longitude (~1 km), of the second place each
probe user's filtered recall is measured at, around the home: where the served traffic comes
from (the throughput benchmark's uncached requests are spread the same way)."""
PROBE_PLACE_SEED = 11


def served_depths() -> list[int]:
    """The retrieval depths K the default experiments document serves: the defaults' K first,
    then each deeper or shallower arm's (``retrieval-depth``: 200 and 400)."""
    from recsys.experiments.config import default_config, parse_config

    config = parse_config(default_config())
    first = config.defaults.retrieval_k
    arms = {
        int(arm.params["retrieval_k"])
        for layer in config.layers
        for experiment in layer.experiments
        for arm in experiment.arms
        if "retrieval_k" in arm.params
    }
    return [first, *sorted(arms - {first})]


def _recall_under_filter(
    index: faiss.Index, world: World, tables: FeatureTables, probe_rows: Int64Array
) -> list[FilteredRecall]:
    """recall@K of the retrieve stage for the probe users at their homes and, each once more,
    at a place around it (:data:`PROBE_PLACE_SPREAD_DEG`: served requests come from about
    there, not only from the front door), with the served defaults' delivery radius and every
    item available, at each served depth K (:func:`served_depths`; an IVF index only: a flat
    one is exact). Measured on the unpublished index: the filter keeps a fraction of each
    list, so an nprobe that reaches the target without it may not with it (0.949 at the 4M
    world's former default, benchmarks/README.md), and a deeper K reaches less at the same
    nprobe."""
    import faiss

    from recsys.retrieval.availability import Availability
    from recsys.retrieval.index import FilteredRecall, ItemIndex, recall_ladder
    from recsys.retrieval.retriever import Retriever, recall_under_filter
    from recsys.types import Location, PipelineParams

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return []
    defaults = PipelineParams()
    ivf.make_direct_map()  # the top-up reconstructs items; dropped before the index is written
    try:
        candidate = ItemIndex(
            version="unpublished", dimension=int(tables.item_vectors.shape[1]),
            count=int(index.ntotal),
            default_nprobe=int(ivf.nlist), manifest={}, faiss_index=index,
        )  # fmt: skip
        retriever = Retriever(
            candidate, tables.user_vectors, world.catalogue, tables.item_popularity,
            Availability.from_document(world.catalogue), cell_selectors=2 * len(probe_rows),
        )  # fmt: skip
        lat = np.asarray(world.users.home_lat, dtype=np.float64)[probe_rows]
        lon = np.asarray(world.users.home_lon, dtype=np.float64)[probe_rows]
        spread = np.random.default_rng(PROBE_PLACE_SEED).normal(
            0.0, PROBE_PLACE_SPREAD_DEG, size=(2, probe_rows.size)
        )
        places = [
            Location(float(a), float(o))
            for a, o in zip(
                np.concatenate([lat, lat + spread[0]]).tolist(),
                np.concatenate([lon, lon + spread[1]]).tolist(),
                strict=True,
            )
        ]
        rows = np.concatenate([probe_rows, probe_rows])
        nprobes = [p for p in recall_ladder(int(ivf.nlist), 1) if p >= 16]
        measured = []
        for k in served_depths():
            by_nprobe = recall_under_filter(
                retriever, tables.item_vectors, rows, places,
                k=k, radius_km=defaults.radius_km, nprobes=nprobes,
            )  # fmt: skip
            measured.append(FilteredRecall(k, defaults.radius_km, len(places), by_nprobe))
    finally:
        ivf.set_direct_map_type(faiss.DirectMap.NoMap)  # type: ignore[attr-defined]
    return measured
