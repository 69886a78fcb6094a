"""What the retrieve stage's FAISS scan costs on the served index, and what cuts were tried.

On the served IVF-Flat index (inner product on augmented vectors) with the delivery radius
inside the search (one selector per delivery cell), this measures, per query, in process CPU
time of one FAISS thread, for known users at a place near their home (jittered ~1 km):

- ``scan``: one FAISS call alone: the coarse quantizer, then the IVF scan with no selector, the
  availability selector and the cell selector, at k = the stage's fetch and k = 1 (the scan
  without the result heap);
- ``nprobe``: the whole retrieve stage (``Retriever.retrieve_batch``) at several nprobe, with
  recall@K against exact search over the eligible items (available and within the radius);
- ``regions``: the same inverted lists split by region (a grid of ``--region-deg``): an item
  goes to list (cluster, region) and a query searches, with ``search_preassigned``, only the
  lists of its nprobe clusters in the regions its delivery cell can reach;
- ``fastscan``: 4-bit PQ fast-scan codes on the served coarse centroids, searched with the
  cell selector, then an exact re-rank of the fetched items;
- ``nlist``: an IVF-Flat index with ``--nlist`` lists built from the same items, at several
  nprobe, through the whole stage;
- ``margin``: the whole stage at several ``CELL_FETCH_MARGIN`` (``--margins``): how deep each
  cell's search fetches beyond the share the exact radius is expected to drop, against how many
  queries then need a deeper search.

    python -m benchmarks.bench_retrieve_scan --artifacts /tmp/speed-art4m \
        [--queries 150] [--k 200] [--parts scan,nprobe,regions,fastscan,nlist,margin]

Every row is one JSON line with the load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from recsys.artifacts import ArtifactRoot
from recsys.geo import EARTH_RADIUS_KM, haversine_km
from recsys.ranking.features import load_feature_tables
from recsys.retrieval import retriever as retriever_module
from recsys.retrieval.availability import Availability
from recsys.retrieval.index import ItemIndex, build_index
from recsys.retrieval.retriever import (
    RetrievalQuery,
    Retriever,
    cell_of,
    cell_reach_km,
    exact_top_eligible,
)
from recsys.types import Int64Array, Location
from recsys.world import load_world

RADIUS_KM = 8.0
JITTER_DEG = 0.01
"""Requests come from near the user's home, not exactly from it (as in bench_throughput)."""
CHUNK = 500_000


@dataclass
class Setup:
    index: ItemIndex
    retriever: Retriever
    availability: Availability
    items: np.ndarray
    queries: list[RetrievalQuery]
    truth: dict[int, Int64Array]
    """Exact top-K of the eligible items for each query's user row."""
    k: int


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextmanager
def per_query_ms(n: int, out: dict[str, float], key: str) -> Iterator[None]:
    start = cpu_seconds()
    yield
    out[key] = round((cpu_seconds() - start) / n * 1e3, 3)


def emit(row: dict[str, Any]) -> None:
    print(json.dumps({**row, "load": round(os.getloadavg()[0], 2)}), flush=True)


def setup(artifacts: Path, n_queries: int, k: int, seed: int) -> Setup:
    root = ArtifactRoot(artifacts)
    index_dir = root.latest(root.indexes)
    lineage = root.lineage(index_dir.name)
    world = load_world(lineage.world_dir)
    tables = load_feature_tables(lineage.features_dir, world.catalogue)
    index = ItemIndex.load(
        index_dir, expected_dimension=tables.dim, expected_count=world.catalogue.n_items
    )
    availability = Availability.from_document(world.catalogue)
    retriever = Retriever(
        index, tables.user_vectors, world.catalogue, tables.item_popularity, availability,
        cell_selectors=4 * n_queries,
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    vectors = np.asarray(tables.user_vectors)
    known = np.flatnonzero(np.abs(vectors).sum(axis=1) > 0)
    users = np.sort(rng.choice(known, size=min(n_queries, known.size), replace=False))
    items = np.asarray(tables.item_vectors)
    queries, truth = [], {}
    for u in users.tolist():
        location = Location(
            float(tables.user_home_lat[u]) + rng.normal(0, JITTER_DEG),
            float(tables.user_home_lon[u]) + rng.normal(0, JITTER_DEG),
        )
        truth[u] = exact_top_eligible(retriever, items, u, location, k=k, radius_km=RADIUS_KM)
        queries.append(
            RetrievalQuery(user_row=u, location=location, k=k, nprobe=0, radius_km=RADIUS_KM)
        )
    return Setup(index, retriever, availability, items, queries, truth, k)


def recall(s: Setup, found: Callable[[RetrievalQuery], Int64Array]) -> float:
    return float(np.mean([np.isin(s.truth[q.user_row], found(q)).mean() for q in s.queries]))


def stage_row(s: Setup, retriever: Retriever, label: str, nprobe: int) -> None:
    """The whole retrieve stage at ``nprobe`` (0: the index default), one query per call."""
    queries = [dataclasses.replace(q, nprobe=nprobe) for q in s.queries]
    for q in queries:  # builds the cells' bitmaps: not timed
        retriever.retrieve_batch([q])
    by_row = {q.user_row: q for q in queries}
    got = recall(s, lambda q: retriever.retrieve_batch([by_row[q.user_row]])[0].sku_ids)
    timing: dict[str, float] = {}
    with per_query_ms(len(queries), timing, "stage_ms_per_query"):
        for q in queries:
            retriever.retrieve_batch([q])
    emit({"part": label, "nprobe": nprobe or retriever._index.default_nprobe,
          f"recall@{s.k}": round(got, 4), **timing})  # fmt: skip


def scan_rows(s: Setup) -> None:
    index = s.index.faiss_index
    ivf = faiss.extract_index_ivf(index)
    x = s.index.query_matrix(s.retriever._user_vectors[[q.user_row for q in s.queries]])
    n = len(s.queries)
    cells = [s.retriever.cells.get(cell_of(q.location), RADIUS_KM, s.availability)
             for q in s.queries if q.location is not None]  # fmt: skip
    timing: dict[str, float] = {}
    with per_query_ms(n, timing, "ms_per_query"):
        for i in range(n):
            ivf.quantizer.search(x[i : i + 1], s.index.default_nprobe)
    emit({"part": "scan", "what": "coarse quantizer only", **timing})
    fetch = s.retriever._fetch(s.queries[0], cell_of(s.queries[0].location))  # type: ignore[arg-type]
    for k, nprobe, selector in (
        (fetch, s.index.default_nprobe, "none"),
        (fetch, s.index.default_nprobe, "availability"),
        (fetch, s.index.default_nprobe, "cell"),
        (1, s.index.default_nprobe, "none"),
        (1, s.index.default_nprobe, "cell"),
        (fetch, s.index.default_nprobe // 2, "cell"),
    ):
        with per_query_ms(n, timing, "ms_per_query"):
            for i in range(n):
                params = faiss.SearchParametersIVF()
                params.nprobe = nprobe
                if selector == "availability":
                    params.sel = s.availability.selector.faiss_selector
                elif selector == "cell":
                    params.sel = cells[i].faiss_selector
                index.search(x[i : i + 1], k, params=params)
        emit({"part": "scan", "what": "one FAISS call", "k": k, "nprobe": nprobe,
              "selector": selector, **timing})  # fmt: skip


def stored_vectors(s: Setup) -> np.ndarray:
    index = s.index.faiss_index
    n = s.index.count
    return np.vstack([
        index.reconstruct_batch(np.arange(a, min(a + CHUNK, n), dtype=np.int64))
        for a in range(0, n, CHUNK)
    ])  # fmt: skip


def list_of_item(s: Setup) -> Int64Array:
    """Each item's inverted list in the served index (from its direct map: list << 32 | offset)."""
    ivf = faiss.extract_index_ivf(s.index.faiss_index)
    return np.asarray(faiss.vector_to_array(ivf.direct_map.array) >> 32, dtype=np.int64)


def region_rows(s: Setup, region_deg: float) -> None:
    """The served lists split by region, searched per query over its reachable regions only."""
    from faiss.contrib.ivf_tools import add_preassigned

    catalogue = s.retriever._geo.catalogue
    ivf = faiss.extract_index_ivf(s.index.faiss_index)
    lat = np.floor(np.asarray(catalogue.restaurant_lat) / region_deg).astype(np.int64)
    lon = np.floor(np.asarray(catalogue.restaurant_lon) / region_deg).astype(np.int64)
    keys, region = np.unique(np.stack([lat, lon], axis=1), axis=0, return_inverse=True)
    n_regions = len(keys)
    region_of = {(int(a), int(b)): r for r, (a, b) in enumerate(keys.tolist())}
    lists = np.ascontiguousarray(
        list_of_item(s) * n_regions + region.ravel()[catalogue.item_restaurant], dtype=np.int64
    )
    x = stored_vectors(s)
    split = faiss.IndexIVFFlat(
        faiss.IndexFlatIP(ivf.d), ivf.d, ivf.nlist * n_regions, faiss.METRIC_INNER_PRODUCT
    )
    split.is_trained = True  # lists are assigned here, never by the quantizer
    # add_preassigned rebinds its ``ids`` argument to a raw pointer: the array must be held here
    ids = np.arange(x.shape[0], dtype=np.int64)
    add_preassigned(split, x, lists, ids)  # type: ignore[no-untyped-call]

    def reachable(cell: tuple[int, int]) -> Int64Array:
        centre, reach = cell_reach_km(cell, RADIUS_KM)
        dlat = math.degrees(reach / EARTH_RADIUS_KM) * 1.01
        dlon = dlat / math.cos(math.radians(centre.lat))
        out = []
        for a in range(math.floor((centre.lat - dlat) / region_deg),
                       math.floor((centre.lat + dlat) / region_deg) + 1):  # fmt: skip
            for b in range(math.floor((centre.lon - dlon) / region_deg),
                           math.floor((centre.lon + dlon) / region_deg) + 1):  # fmt: skip
                r = region_of.get((a, b))
                if r is None:
                    continue
                near_lat = min(max(centre.lat, a * region_deg), (a + 1) * region_deg)
                near_lon = min(max(centre.lon, b * region_deg), (b + 1) * region_deg)
                km = haversine_km(
                    centre.lat, centre.lon, np.array([near_lat]), np.array([near_lon])
                )
                if km[0] <= reach:
                    out.append(r)
        return np.array(out, dtype=np.int64)

    def search(q: RetrievalQuery, fetch: int) -> Int64Array:
        assert q.location is not None
        cell = cell_of(q.location)
        xq = np.ascontiguousarray(  # swig_ptr reads the raw buffer: C order, float32
            s.index.query_matrix(s.retriever._user_vectors[[q.user_row]]),
            dtype=np.float32,
        )
        _, clusters = ivf.quantizer.search(xq, s.index.default_nprobe)
        probe = np.ascontiguousarray((clusters[0][:, None] * n_regions + reachable(cell)).ravel())
        params = faiss.SearchParametersIVF()
        params.nprobe = probe.size
        allowed = s.retriever.cells.get(cell, RADIUS_KM, s.availability)  # owns the bitmap
        params.sel = allowed.faiss_selector
        distances = np.empty((1, fetch), dtype=np.float32)
        ids = np.empty((1, fetch), dtype=np.int64)
        coarse = np.zeros((1, probe.size), dtype=np.float32)
        split.search_preassigned_c(  # type: ignore[attr-defined]  # the C call takes params
            1, faiss.swig_ptr(xq), fetch, faiss.swig_ptr(probe), faiss.swig_ptr(coarse),
            faiss.swig_ptr(distances), faiss.swig_ptr(ids), False, params,
        )  # fmt: skip
        found = ids[0][ids[0] >= 0]
        near = s.retriever._geo.within(q.location.lat, q.location.lon, RADIUS_KM, found)
        return np.asarray(found[near], dtype=np.int64)

    for factor in (1.5, 3.0):
        fetch = int(s.k * factor)
        got = recall(s, lambda q, f=fetch: search(q, f)[: s.k])  # type: ignore[misc]
        timing: dict[str, float] = {}
        with per_query_ms(len(s.queries), timing, "search_ms_per_query"):
            for q in s.queries:
                search(q, fetch)
        emit({"part": "regions", "region_deg": region_deg, "regions": n_regions,
              "lists": ivf.nlist * n_regions, "fetch": fetch, f"recall@{s.k}": round(got, 4),
              **timing})  # fmt: skip


def fastscan_rows(s: Setup, m: int) -> None:
    """4-bit PQ fast-scan codes (``m`` sub-quantizers) on the served coarse centroids, with the
    cell selector, then the fetched items re-ranked exactly."""
    ivf = faiss.extract_index_ivf(s.index.faiss_index)
    quantizer = faiss.IndexFlat(ivf.d, ivf.quantizer.metric_type)  # as the served one
    quantizer.add(ivf.quantizer.reconstruct_n(0, ivf.nlist))
    index = faiss.IndexIVFPQFastScan(quantizer, ivf.d, ivf.nlist, m, 4, faiss.METRIC_INNER_PRODUCT)
    index.by_residual = False
    x = stored_vectors(s)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    sample = np.random.default_rng(1).choice(x.shape[0], min(x.shape[0], 200_000), replace=False)
    start = time.perf_counter()
    index.train(x[np.sort(sample)])
    for a in range(0, x.shape[0], CHUNK):
        index.add(x[a : a + CHUNK])
    build_s = time.perf_counter() - start
    faiss.omp_set_num_threads(1)
    users = s.retriever._user_vectors

    def search(q: RetrievalQuery, fetch: int, nprobe: int) -> Int64Array:
        assert q.location is not None
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe
        allowed = s.retriever.cells.get(cell_of(q.location), RADIUS_KM, s.availability)
        params.sel = allowed.faiss_selector  # ``allowed`` owns the bitmap: keep it alive
        _, ids = index.search(s.index.query_matrix(users[[q.user_row]]), fetch, params=params)
        found = ids[0][ids[0] >= 0]
        found = found[s.retriever._geo.within(q.location.lat, q.location.lon, RADIUS_KM, found)]
        exact = s.items[found] @ users[q.user_row]
        return np.asarray(found[np.argsort(-exact)[: s.k]], dtype=np.int64)

    for nprobe in (s.index.default_nprobe, s.index.default_nprobe * 3 // 2):
        for fetch in (3 * s.k, 10 * s.k):
            got = recall(s, lambda q, f=fetch, p=nprobe: search(q, f, p))  # type: ignore[misc]
            timing: dict[str, float] = {}
            with per_query_ms(len(s.queries), timing, "search_and_rerank_ms_per_query"):
                for q in s.queries:
                    search(q, fetch, nprobe)
            emit({"part": "fastscan", "m": m, "code_bytes": int(index.code_size),
                  "build_s": round(build_s, 1), "nprobe": nprobe, "fetch": fetch,
                  f"recall@{s.k}": round(got, 4), **timing})  # fmt: skip


def nlist_rows(s: Setup, nlist: int, nprobes: list[int]) -> None:
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    built = build_index(s.items, nlist=nlist)
    build_s = time.perf_counter() - start
    faiss.omp_set_num_threads(1)
    faiss.extract_index_ivf(built).make_direct_map()
    index = ItemIndex(
        version=f"nlist{nlist}", dimension=s.index.dimension, count=s.index.count,
        default_nprobe=nprobes[0], manifest={}, faiss_index=built,
    )  # fmt: skip
    retriever = Retriever(
        index, s.retriever._user_vectors, s.retriever._geo.catalogue, s.retriever._popularity,
        s.availability, cell_selectors=4 * len(s.queries),
    )  # fmt: skip
    emit({"part": "nlist", "nlist": nlist, "build_s": round(build_s, 1)})
    for nprobe in nprobes:
        stage_row(s, retriever, f"nlist {nlist}", nprobe)


def margin_rows(s: Setup, margins: list[float]) -> None:
    """The served stage at each fetch margin, with the FAISS calls it made per query."""
    served = retriever_module.CELL_FETCH_MARGIN
    search = s.index.search
    calls = [0]

    def counted(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        calls[0] += 1
        return search(*args, **kwargs)

    s.index.search = counted  # type: ignore[method-assign]
    try:
        for margin in margins:
            retriever_module.CELL_FETCH_MARGIN = margin
            calls[0] = 0
            for q in s.queries:
                s.retriever.retrieve_batch([q])
            emit({"part": "margin", "margin": margin,
                  "searches_per_query": round(calls[0] / len(s.queries), 3)})  # fmt: skip
            stage_row(s, s.retriever, f"margin {margin}", 0)
    finally:
        retriever_module.CELL_FETCH_MARGIN = served
        del s.index.search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--queries", type=int, default=150)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", default="scan,nprobe,regions,fastscan")
    parser.add_argument("--nprobes", default="64,96,128", help="the nprobe part's values")
    parser.add_argument("--region-deg", type=float, default=0.03)
    parser.add_argument("--fastscan-m", type=int, default=33, help="must divide the index dim")
    parser.add_argument("--nlist", type=int, default=16_384)
    parser.add_argument("--nlist-nprobes", default="256,384,512")
    parser.add_argument("--margins", default="1.15,1.3,1.5", help="the margin part's values")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    faiss.omp_set_num_threads(1)
    s = setup(args.artifacts, args.queries, args.k, args.seed)
    emit({"queries": len(s.queries), "k": s.k, "index": s.index.version,
          "nlist": s.index.nlist, "default_nprobe": s.index.default_nprobe})  # fmt: skip
    if "scan" in parts:
        scan_rows(s)
    if "nprobe" in parts:
        for nprobe in (int(p) for p in args.nprobes.split(",")):
            stage_row(s, s.retriever, "served stage", nprobe)
    if "regions" in parts:
        region_rows(s, args.region_deg)
    if "fastscan" in parts:
        fastscan_rows(s, args.fastscan_m)
    if "nlist" in parts:
        nlist_rows(s, args.nlist, [int(p) for p in args.nlist_nprobes.split(",")])
    if "margin" in parts:
        margin_rows(s, [float(m) for m in args.margins.split(",")])


if __name__ == "__main__":
    main()
