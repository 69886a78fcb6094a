"""Index types and parameters on the build's own item vectors: build time, memory, recall, latency.

Reads the item and user vectors of the newest features version in ``--artifacts`` (what
`recsys build` learned), samples ``--queries`` known users as queries, computes their exact
top-500 by brute force, then builds each index kind and measures, per search parameter:

- recall@100 and recall@500 against the exact search;
- CPU ms per query searched alone (one query per FAISS call, one thread) and batched
  (``--batch`` queries per call, one thread): CPU time, so a busy machine does not inflate it;
- filtered rows: the same search with the catalogue's availability mask (closed restaurants,
  sold-out items) plus a share of restaurants switched off, inside FAISS (IDSelectorBitmap),
  against exact search over the allowed items; and the full retrieve stage with the default
  delivery radius around each user's home, against brute force over the eligible items.

The kinds compared here store the augmented vectors (norm-equalising extra coordinate), so
inner-product order equals L2 order and HNSW (L2) can be compared fairly. The IVF kinds share
one coarse quantizer (trained once; its time is added to each build time). The radius part runs
the served version as it is (since the raw-lists change, builds store raw vectors and choose
lists by inner product; on a version of the older layout it adds that layout's lists re-laid).

    python -m benchmarks.bench_index --artifacts /tmp/art4m [--queries 200] [--kinds ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import resource
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from recsys.artifacts import ArtifactRoot
from recsys.retrieval.availability import Availability
from recsys.retrieval.index import (
    TRAIN_POINTS_PER_LIST,
    augment_items,
    default_nlist,
    exact_neighbours,
    recall_at_k,
)
from recsys.types import Float32Array, Int64Array, Location
from recsys.world import load_world

KS = (100, 500)
NPROBES = (16, 32, 64, 128, 256)
EF_SEARCH = (500, 1000, 2000)
"""efSearch must be at least K = 500."""
REFINE_FACTOR = 2
faiss_any: Any = faiss  # the stubs lack SearchParametersHNSW


@dataclass
class Row:
    kind: str
    param: str
    build_s: float
    memory_mb: float
    recall: dict[int, float]
    alone_ms: float
    batched_ms: float
    note: str = ""

    def markdown(self) -> str:
        r = " | ".join(f"{self.recall[k]:.3f}" for k in KS)
        return (
            f"| {self.kind} | {self.param} | {self.build_s:.0f} | {self.memory_mb:,.0f} | {r} | "
            f"{self.alone_ms:.2f} | {self.batched_ms:.3f} | {self.note} |"
        )


HEADER = (
    "| index | search parameter | build s | memory MB | recall@100 | recall@500 | "
    "ms/query alone | ms/query batched | note |\n"
    "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
)


@contextmanager
def cpu_timer() -> Iterator[list[float]]:
    """Process CPU seconds (user + system) spent inside the block, appended to the list."""
    out: list[float] = []
    start = time.process_time()
    yield out
    out.append(time.process_time() - start)


def index_megabytes(index: faiss.Index) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "index.faiss")
        faiss.write_index(index, path)
        return os.path.getsize(path) / 1e6


def measure(
    search: Callable[[Float32Array, int], Int64Array],
    queries: Float32Array,
    truth: Int64Array,
    batch: int,
) -> tuple[dict[int, float], float, float]:
    """Recall at each K, and CPU ms per query alone and batched (one FAISS thread)."""
    faiss.omp_set_num_threads(1)
    found = search(queries, max(KS))
    recall = {k: recall_at_k(found[:, :k], truth[:, :k]) for k in KS}
    alone = min(len(queries), 100)
    with cpu_timer() as t_alone:
        for i in range(alone):  # one call per query: what "alone" means
            search(queries[i : i + 1], max(KS))
    with cpu_timer() as t_batch:
        for start in range(0, len(queries), batch):
            search(queries[start : start + batch], max(KS))
    faiss.omp_set_num_threads(2)  # builds use both cores
    return recall, 1e3 * t_alone[0] / alone, 1e3 * t_batch[0] / len(queries)


def ivf_search_params(nprobe: int, selector: faiss.IDSelector | None = None) -> Any:
    params = faiss.SearchParametersIVF()
    params.nprobe = nprobe
    if selector is not None:
        params.sel = selector
    return params


def train_quantizer(x: Float32Array, nlist: int, seed: int) -> tuple[faiss.IndexFlatL2, float]:
    start = time.perf_counter()
    n_train = min(x.shape[0], nlist * TRAIN_POINTS_PER_LIST)
    rows = np.sort(np.random.default_rng(seed).choice(x.shape[0], size=n_train, replace=False))
    km = faiss.Kmeans(x.shape[1], nlist, niter=20, seed=seed, spherical=False)
    km.train(x[rows])
    quantizer = faiss.IndexFlatL2(x.shape[1])
    quantizer.add(km.centroids)
    return quantizer, time.perf_counter() - start


def ivf_rows(
    kind: str,
    x: Float32Array,
    quantizer: faiss.IndexFlatL2,
    quantizer_s: float,
    queries: Float32Array,
    truth: Int64Array,
    batch: int,
    seed: int,
) -> Iterator[tuple[Row, faiss.Index]]:
    nlist, d = int(quantizer.ntotal), x.shape[1]
    start = time.perf_counter()
    base: faiss.IndexIVF
    if kind == "ivf_flat":
        base = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    elif kind == "ivf_sq8":
        base = faiss.IndexIVFScalarQuantizer(
            quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
        # Codes of the vectors themselves: residuals (the default) lose most of the recall with
        # inner product on these vectors (recall@100 0.62 vs 0.99 at 100k, every list probed).
        base.by_residual = False
    elif kind == "ivf_pq":
        base = faiss.IndexIVFPQ(quantizer, d, nlist, 11, 8, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ValueError(f"kind: expected ivf_flat, ivf_sq8 or ivf_pq, got {kind!r}")
    base.cp.seed = seed
    if kind != "ivf_flat":
        sample = np.random.default_rng(seed).choice(x.shape[0], size=min(x.shape[0], 262_144))
        base.train(x[np.sort(sample)])  # the quantizer is trained already: only the codes
    else:
        base.is_trained = True
    base.add(x)
    index: faiss.Index = base
    label = {"ivf_flat": "IVF{n},Flat", "ivf_sq8": "IVF{n},SQ8", "ivf_pq": "IVF{n},PQ11"}[kind]
    label = label.format(n=nlist)
    if kind != "ivf_flat":
        index = faiss.IndexRefineFlat(base, faiss.swig_ptr(x))
        label += f" + refine x{REFINE_FACTOR}"
    build_s = quantizer_s + time.perf_counter() - start
    memory = index_megabytes(index)
    for nprobe in NPROBES:
        params: Any
        if kind == "ivf_flat":
            params = ivf_search_params(nprobe)
        else:
            # The refine parameters hold a raw pointer: keep the IVF ones alive beside them.
            ivf_params = ivf_search_params(nprobe)
            params = faiss.IndexRefineSearchParameters()
            params.k_factor = REFINE_FACTOR
            params.base_index_params = ivf_params
            params.keep_alive = ivf_params

        def search(q: Float32Array, k: int, p: Any = params) -> Int64Array:
            return np.asarray(index.search(q, k, params=p)[1], dtype=np.int64)

        recall, alone, batched = measure(search, queries, truth, batch)
        yield Row(label, f"nprobe {nprobe}", build_s, memory, recall, alone, batched), index


def hnsw_rows(
    x: Float32Array,
    queries: Float32Array,
    truth: Int64Array,
    batch: int,
    m: int,
    inner_product: bool = False,
) -> Iterator[Row]:
    """HNSW with L2 on the augmented vectors (on the sphere, L2 order = inner-product order), or
    with ``inner_product`` on the raw vectors (pass raw items and queries then)."""
    start = time.perf_counter()
    metric = faiss.METRIC_INNER_PRODUCT if inner_product else faiss.METRIC_L2
    index = faiss.IndexHNSWFlat(x.shape[1], m, metric)
    index.hnsw.efConstruction = 40
    index.add(x)
    build_s = time.perf_counter() - start
    memory = index_megabytes(index)
    for ef in EF_SEARCH:
        params = faiss_any.SearchParametersHNSW()
        params.efSearch = ef

        def search(q: Float32Array, k: int, p: Any = params) -> Int64Array:
            return np.asarray(index.search(q, k, params=p)[1], dtype=np.int64)

        recall, alone, batched = measure(search, queries, truth, batch)
        label = f"HNSW{m},Flat" + (" (IP, raw vectors)" if inner_product else "")
        yield Row(label, f"efSearch {ef}", build_s, memory, recall, alone, batched)


def filtered_rows(
    index: faiss.Index,
    label: str,
    items: Float32Array,
    queries: Float32Array,
    allowed: Availability,
    note: str,
    batch: int,
) -> Iterator[Row]:
    """Searches filtered inside FAISS, against exact search over the allowed items only."""
    rows = np.flatnonzero(allowed.item_mask)
    truth = rows[exact_neighbours(np.ascontiguousarray(items[rows]), queries[:, :-1], max(KS))]
    for nprobe in NPROBES[1:]:
        params = ivf_search_params(nprobe, allowed.selector.faiss_selector)

        def search(q: Float32Array, k: int, p: Any = params) -> Int64Array:
            return np.asarray(index.search(q, k, params=p)[1], dtype=np.int64)

        recall, alone, batched = measure(search, queries, truth, batch)
        yield Row(label, f"nprobe {nprobe}", 0, 0, recall, alone, batched, note)


def fp16_copy(index: Any, items: Float32Array) -> Any:
    """The served IVF index with its inverted lists stored as fp16 (same coarse quantizer and
    list assignment, vectors themselves, not residuals), as an ItemIndex."""

    ivf = faiss.extract_index_ivf(index.faiss_index)
    x = augment_items(items) if index.augmented else np.ascontiguousarray(items, np.float32)
    sq = faiss.IndexIVFScalarQuantizer(
        ivf.quantizer, x.shape[1], int(ivf.nlist), faiss.ScalarQuantizer.QT_fp16,
        faiss.METRIC_INNER_PRODUCT,
    )  # fmt: skip
    sq.by_residual = False
    sq.train(x[:1024])  # the quantizer is trained already; fp16 codes need no training
    sq.add(x)
    sq.make_direct_map()  # the quantizer stays the served index's: keep that one alive
    return dataclasses.replace(index, faiss_index=sq, version=index.version + "-fp16")


def raw_lists_copy(index: Any, items: Float32Array) -> Any:
    """A version of the older layout (augmented vectors, lists chosen by L2 distance) with the
    same lists re-laid as :func:`recsys.retrieval.index.build_index` lays them now: the raw
    vectors, and the lists chosen by inner product with the centroids' first coordinates.
    Exactly what a build would make of the same k-means, as an ItemIndex."""

    ivf = faiss.extract_index_ivf(index.faiss_index)
    d = index.dimension
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(np.ascontiguousarray(ivf.quantizer.reconstruct_n(0, ivf.nlist)[:, :d]))
    raw = faiss.IndexIVFFlat(quantizer, d, int(ivf.nlist), faiss.METRIC_INNER_PRODUCT)
    raw.is_trained = True
    lists = np.asarray(faiss.vector_to_array(ivf.direct_map.array) >> 32, dtype=np.int64)
    x = np.ascontiguousarray(items, dtype=np.float32)
    raw.add_core(x.shape[0], faiss.swig_ptr(x), None, faiss.swig_ptr(lists))
    raw.make_direct_map()
    return dataclasses.replace(index, faiss_index=raw, version=index.version + "-raw")


def radius_rows(
    artifacts: Path,
    rng: np.random.Generator,
    n_queries: int,
    batch: int,
    radius_km: float,
    nprobes: tuple[int, ...] = (),
) -> Iterator[Row]:
    """The whole retrieve stage (serving's Retriever on the served index) with a delivery
    radius around each user's home, against brute force over the eligible items: the radius
    filtered after an 8x search (the old path), inside the search per delivery cell (served),
    and inside the search on fp16 inverted lists. On a version of the older layout
    (augmented vectors, L2 probes), also its lists re-laid as builds lay them now (raw vectors,
    probes by inner product: :func:`raw_lists_copy`), at the default nprobe and ``nprobes``."""
    from recsys.ranking.features import load_feature_tables
    from recsys.retrieval.index import ItemIndex
    from recsys.retrieval.retriever import Retriever

    root = ArtifactRoot(artifacts)
    index_dir = root.latest(root.indexes)
    lineage = root.lineage(index_dir.name)
    features_dir = lineage.features_dir
    world = load_world(lineage.world_dir)
    tables = load_feature_tables(features_dir, world.catalogue)
    start = time.perf_counter()
    index = ItemIndex.load(
        index_dir, expected_dimension=tables.dim, expected_count=world.catalogue.n_items
    )
    load_s = time.perf_counter() - start
    availability = Availability.from_document(world.catalogue)
    known = np.flatnonzero(np.abs(np.asarray(tables.user_vectors)).sum(axis=1) > 0)
    users = np.sort(rng.choice(known, size=min(n_queries, known.size), replace=False))
    items = np.asarray(tables.item_vectors)
    faiss.omp_set_num_threads(2)
    fp16 = fp16_copy(index, items)
    faiss.omp_set_num_threads(1)
    variants = [
        ("radius after an 8x search", index, False, 0),
        ("radius inside the search (cells)", index, True, 0),
        ("radius inside the search, fp16 lists", fp16, True, 0),
    ]
    variants += [("radius inside the search (cells)", index, True, p) for p in nprobes]
    searched_indexes = [index, fp16]
    if index.augmented and index.nlist:
        raw = raw_lists_copy(index, items)
        searched_indexes.append(raw)
        label = "radius inside the search, raw lists, inner-product probes"
        variants += [(label, raw, True, p) for p in (0, *nprobes)]
    memory = {id(i): index_megabytes(i.faiss_index) for i in searched_indexes}
    for (label, searched, in_search, nprobe), k in itertools.product(variants, KS):
        retriever = Retriever(
            searched, tables.user_vectors, world.catalogue, tables.item_popularity, availability,
            radius_in_search=in_search, cell_selectors=4 * n_queries,
        )  # fmt: skip
        yield from _radius_row(
            retriever, label, searched, items, tables, users, k, radius_km, batch, load_s,
            memory[id(searched)], nprobe,
        )  # fmt: skip


def _radius_row(
    retriever: Any,
    label: str,
    index: Any,
    items: Float32Array,
    tables: Any,
    users: Int64Array,
    k: int,
    radius_km: float,
    batch: int,
    load_s: float,
    memory_mb: float,
    nprobe: int = 0,
) -> Iterator[Row]:
    from recsys.retrieval.retriever import RetrievalQuery, exact_top_eligible

    availability = retriever.availability
    queries = [
        RetrievalQuery(
            user_row=int(u),
            location=Location(float(tables.user_home_lat[u]), float(tables.user_home_lon[u])),
            k=k,
            nprobe=nprobe,
            radius_km=radius_km,
        )
        for u in users
    ]
    recalls = []
    for q in queries:  # the brute-force reference, one query at a time: not timed
        assert q.location is not None
        top = exact_top_eligible(retriever, items, q.user_row, q.location, k=k, radius_km=radius_km)
        got = retriever.retrieve_batch([q])[0].sku_ids
        recalls.append(np.isin(top, got).mean() if top.size else 1.0)
    with cpu_timer() as t_alone:
        for q in queries:
            retriever.retrieve_batch([q])
    with cpu_timer() as t_batch:
        for start_at in range(0, len(queries), batch):
            retriever.retrieve_batch(queries[start_at : start_at + batch])
    eligible_counts = [
        int(availability.item_mask[retriever._geo.items_near(q.location, radius_km)].sum())
        for q in queries
        if q.location is not None
    ]
    recall = {kk: float(np.mean(recalls)) if kk == k else float("nan") for kk in KS}
    yield Row(
        f"served {index.manifest.get('kind')} nlist {index.nlist} (Retriever): {label}",
        f"nprobe {nprobe}, k={k}" if nprobe else f"default nprobe {index.default_nprobe}, k={k}",
        load_s,
        memory_mb,
        recall,
        1e3 * t_alone[0] / len(queries),
        1e3 * t_batch[0] / len(queries),
        f"radius {radius_km:g} km around home, median {int(np.median(eligible_counts)):,} "
        f"eligible items; recall@{k} only; build s = load+validate s",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--nlist", type=int, default=0, help="0: what build uses")
    parser.add_argument(
        "--kinds",
        default="ivf_flat,ivf_sq8,ivf_pq,hnsw,filtered,radius",
        help="comma-separated: ivf_flat, ivf_sq8, ivf_pq, hnsw, hnsw_ip, filtered, radius",
    )
    parser.add_argument("--hnsw-items", type=int, default=0, help="0: all items")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--radius-km", type=float, default=8.0)
    parser.add_argument("--off-share", type=float, default=0.5, help="restaurants switched off")
    parser.add_argument(
        "--radius-nprobes", default="64,96,128", help="the radius part's nprobe values"
    )
    args = parser.parse_args()
    kinds = set(args.kinds.split(","))

    root = ArtifactRoot(args.artifacts)
    features_dir = root.latest(root.features)
    items = np.ascontiguousarray(np.load(features_dir / "item_vectors.npy"), dtype=np.float32)
    users = np.load(features_dir / "user_vectors.npy")
    rng = np.random.default_rng(args.seed)
    known = np.flatnonzero(np.abs(users).sum(axis=1) > 0)
    picked = np.sort(rng.choice(known, size=min(args.queries, known.size), replace=False))
    raw_queries = np.ascontiguousarray(users[picked], dtype=np.float32)
    queries = np.hstack([raw_queries, np.zeros((raw_queries.shape[0], 1), np.float32)])
    x = augment_items(items)
    n = x.shape[0]
    print(f"{n:,} items x {items.shape[1]} dims from {features_dir}; {len(queries)} queries")

    faiss.omp_set_num_threads(2)
    start = time.perf_counter()
    truth = exact_neighbours(items, raw_queries, max(KS))
    exact_s = time.perf_counter() - start
    faiss.omp_set_num_threads(1)
    with cpu_timer() as t_exact:
        for i in range(10):
            exact_neighbours(items, raw_queries[i : i + 1], max(KS))
    exact = Row(
        "Flat (exact)", "-", 0, n * x.shape[1] * 4 / 1e6, {k: 1.0 for k in KS},
        1e3 * t_exact[0] / 10, 1e3 * exact_s * 2 / len(queries),
        "batched: wall ms x 2 threads over all queries",
    )  # fmt: skip
    rows = [exact]
    print(HEADER)
    print(rows[0].markdown(), flush=True)

    nlist = args.nlist or default_nlist(n)
    ivf_flat: faiss.Index | None = None
    ivf_kinds = [k for k in ("ivf_flat", "ivf_sq8", "ivf_pq") if k in kinds]
    if ivf_kinds or "filtered" in kinds:
        faiss.omp_set_num_threads(2)
        quantizer, quantizer_s = train_quantizer(x, nlist, args.seed)
        for kind in ivf_kinds or ["ivf_flat"]:
            for row, index in ivf_rows(
                kind, x, quantizer, quantizer_s, queries, truth, args.batch, args.seed
            ):
                rows.append(row)
                print(row.markdown(), flush=True)
                if kind == "ivf_flat":
                    ivf_flat = index
            if kind != "ivf_flat":
                del index
    if "filtered" in kinds and ivf_flat is not None:
        world_dir = root.latest(root.world)
        catalogue = load_world(world_dir).catalogue
        base = Availability.from_document(catalogue)
        off = np.sort(
            rng.choice(
                catalogue.n_restaurants,
                size=int(args.off_share * catalogue.n_restaurants),
                replace=False,
            )
        )
        heavy = Availability.from_document(catalogue, {"restaurants_off": off.tolist()})
        for allowed, note in (
            (base, f"catalogue availability: {base.n_available / n:.0%} of items servable"),
            (heavy, f"{args.off_share:.0%} restaurants off: {heavy.n_available / n:.0%} servable"),
        ):
            for row in filtered_rows(
                ivf_flat, f"IVF{nlist},Flat filtered", items, queries, allowed, note, args.batch
            ):
                rows.append(row)
                print(row.markdown(), flush=True)
    if kinds & {"hnsw", "hnsw_ip"}:
        del ivf_flat
        m = args.hnsw_items or n
        faiss.omp_set_num_threads(2)
        sub = np.arange(m) if m >= n else np.sort(rng.choice(n, size=m, replace=False))
        hx = np.ascontiguousarray(x[sub])
        sub_truth = truth
        note = ""
        if m < n:
            sub_truth = exact_neighbours(np.ascontiguousarray(items[sub]), raw_queries, max(KS))
            note = f"on a {m:,}-item sample"
        runs = []
        if "hnsw" in kinds:
            runs.append((hx, queries, False))
        if "hnsw_ip" in kinds:
            runs.append((np.ascontiguousarray(items[sub]), raw_queries, True))
        for vectors, q, inner_product in runs:
            for row in hnsw_rows(vectors, q, sub_truth, args.batch, args.hnsw_m, inner_product):
                row.note = note
                rows.append(row)
                print(row.markdown(), flush=True)
    if "radius" in kinds:
        faiss.omp_set_num_threads(1)
        nprobes = tuple(int(p) for p in args.radius_nprobes.split(",") if p)
        for row in radius_rows(
            args.artifacts, rng, args.queries, args.batch, args.radius_km, nprobes
        ):
            print(row.markdown().replace("nan", "-"), flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:,.0f} MB")


if __name__ == "__main__":
    main()
