"""FAISS item index versions: build, publish with a measured recall, load and validate, search.

Item vectors come from matrix factorisation, so the inner product is the preference score and the
index is an inner-product one. Small catalogues get an exact flat index; larger ones an IVF-Flat
index whose recall at the serving ``nprobe`` is measured on probe queries (real user vectors)
when the version is published, and measured again before a server serves it.

MF item norms vary a lot (popular items are long), and IVF lists clustered on the raw vectors
then scatter the longest items, which dominate every user's top-k, over many lists: recall@200
at nprobe 32 was 0.48 on the demo world. So k-means clusters each item with one extra
coordinate, sqrt(M^2 - |x|^2) for the largest norm M (the MIPS to nearest-neighbour reduction):
every augmented vector has norm M and k-means clusters them on that sphere (recall@200 at
nprobe 32: 0.92 on the same data). Each item goes to the list of its nearest centroid there.

The lists then store the raw item vectors, and a query picks the ``nprobe`` lists whose
centroids (their first ``dimension`` coordinates) have the largest inner product with it. The
extra coordinate adds nothing to an inner product with a query (whose coordinate there would be
0), so storing it only cost memory and scan time; and choosing lists by inner product rather
than by L2 distance to the augmented centroid (which favours centroids of small norm) finds the
same recall with fewer probes: on the 4M world, recall@200 under the delivery filter ~1 km
from home is 0.961 at nprobe 96 against 0.928 (benchmarks/README.md, "Fourth round: raw lists,
lists chosen by inner product"). Versions built before this store the augmented vectors with
an L2 coarse quantizer; they still load and are searched with padded queries
(:attr:`ItemIndex.augmented`).

Item ids in the index are catalogue rows (``sku_id``): vectors are added in row order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from recsys import artifacts
from recsys.artifacts import ArtifactError, ArtifactRoot
from recsys.types import Float32Array, Int64Array

if TYPE_CHECKING:
    from recsys.retrieval.availability import AvailabilitySelector

INDEX_FILE = "index.faiss"
PROBE_FILE = "probe.npy"
PROBE_TRUTH_FILE = "probe_truth.npy"
SEARCH_FILE = "search.json"
"""The version's search defaults, in a file so the version id (a hash of the files) covers them."""

EXACT_BELOW = 20_000
"""Catalogues smaller than this get an exact flat index: a brute-force scan is cheap there."""
MIN_NLIST = 64
MAX_NLIST = 65_536
MIN_POINTS_PER_LIST = 39
"""FAISS k-means wants at least 39 training points per centroid."""
TRAIN_POINTS_PER_LIST = 40
"""Training sample size per inverted list for big catalogues (4M SKUs -> 160k points)."""
KMEANS_ITERATIONS = 10
"""k-means iterations for the coarse quantizer (FAISS's default is 25): at 4M SKUs, 10 train in
a fraction of the time with no measurable loss of recall at the served nprobe."""
ADD_CHUNK = 262_144
"""Items added per FAISS call, so a build can report progress."""
RECALL_LADDER = (4, 8, 16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 256)
"""nprobe values whose recall a published version records, besides its default."""
KIND_FLAT = "flat_ip"
KIND_IVF = "ivf_flat_ip"


class IndexValidationError(ArtifactError):
    """An index version is corrupt, does not fit the catalogue, or retrieves too poorly."""


def default_nlist(n_items: int) -> int:
    """About 2 * sqrt(N) inverted lists (4,000 at 4M SKUs), within [MIN_NLIST, MAX_NLIST] and
    trainable. Measured at 4M (benchmarks/README.md): the served nprobe reaches recall@500 >= 0.95
    scanning ~1% of the items, and k-means trains 4x faster than with 4 * sqrt(N)."""
    nlist = round(2 * math.sqrt(n_items))
    nlist = min(max(nlist, MIN_NLIST), MAX_NLIST)
    return max(1, min(nlist, n_items // MIN_POINTS_PER_LIST))


def _as_matrix(name: str, values: Float32Array, dimension: int | None = None) -> Float32Array:
    array = np.ascontiguousarray(values, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty 2-D float32 array, got shape {array.shape}")
    if dimension is not None and array.shape[1] != dimension:
        raise ValueError(f"{name}: expected dimension {dimension}, got {array.shape[1]}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return array


def augment_items(item_vectors: Float32Array) -> Float32Array:
    """Items with the extra coordinate sqrt(M^2 - |x|^2) that gives them all the norm M."""
    x = _as_matrix("item_vectors", item_vectors)
    norms2 = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    extra = np.sqrt(np.maximum(norms2.max() - norms2, 0.0))
    return np.hstack([x, extra[:, None].astype(np.float32)])


def pad_queries(queries: Float32Array, dimension: int) -> Float32Array:
    """Queries with a 0 in the extra coordinate: inner products with items are unchanged.
    (For versions that store the augmented vectors: :attr:`ItemIndex.augmented`.)"""
    q = _as_matrix("queries", queries, dimension)
    return np.hstack([q, np.zeros((q.shape[0], 1), dtype=np.float32)])


def _stores_augmented(index: faiss.Index, dimension: int) -> bool:
    """Whether ``index`` holds items of ``dimension`` with the extra coordinate (versions built
    before the lists held raw vectors)."""
    return int(index.d) == dimension + 1


def _query_matrix(index: faiss.Index, queries: Float32Array, dimension: int) -> Float32Array:
    """``queries`` as ``index`` takes them: padded if it stores augmented vectors."""
    if _stores_augmented(index, dimension):
        return pad_queries(queries, dimension)
    return _as_matrix("queries", queries, dimension)


def build_index(
    item_vectors: Float32Array,
    *,
    seed: int = 7,
    nlist: int | None = None,
    on_added: Callable[[int], None] | None = None,
) -> faiss.Index:
    """An inner-product index over ``item_vectors`` (ids = rows). Deterministic for a seed.

    ``nlist=None`` picks an exact flat index below :data:`EXACT_BELOW` items and an IVF-Flat
    index with :func:`default_nlist` lists above; an explicit ``nlist`` always builds IVF-Flat.
    Both store the raw vectors (dimension as given). For IVF, k-means runs on the augmented
    vectors (see the module docstring), on a seeded sample of at most
    ``TRAIN_POINTS_PER_LIST * nlist`` of them, each item goes to its nearest centroid there,
    and the coarse quantizer holds the centroids' first ``dimension`` coordinates, searched by
    inner product. ``on_added(n)`` is called after each chunk of ``n`` items is added
    (progress reporting).
    """
    x = _as_matrix("item_vectors", item_vectors)
    n, d = x.shape
    if nlist is None and n < EXACT_BELOW:
        flat = faiss.IndexFlatIP(d)
        _add_in_chunks(flat, x, on_added)
        return flat
    lists = default_nlist(n) if nlist is None else nlist
    if not 1 <= lists <= n:
        raise ValueError(f"nlist: expected 1..{n} (the number of items), got {lists}")
    augmented = augment_items(x)
    # Plain (L2) k-means on the sphere of radius M.
    clustering = faiss.Clustering(d + 1, lists)
    clustering.spherical = False
    clustering.seed = seed
    clustering.niter = KMEANS_ITERATIONS
    n_train = min(n, lists * TRAIN_POINTS_PER_LIST)
    train = augmented
    if n_train < n:
        train = augmented[np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False))]
    sphere = faiss.IndexFlatL2(d + 1)
    clustering.train(train, sphere)
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(np.ascontiguousarray(sphere.reconstruct_n(0, lists)[:, :d]))
    index = faiss.IndexIVFFlat(quantizer, d, lists, faiss.METRIC_INNER_PRODUCT)
    index.is_trained = True
    _add_in_chunks(index, x, on_added, lists_by=(sphere, augmented))
    return index


def _add_in_chunks(
    index: faiss.Index,
    x: Float32Array,
    on_added: Callable[[int], None] | None,
    lists_by: tuple[faiss.Index, Float32Array] | None = None,
) -> None:
    """Add ``x`` to ``index``. With ``lists_by`` = (sphere, augmented) (an IVF index), each item
    goes to the list of the centroid in ``sphere`` nearest its row of ``augmented``."""
    for start in range(0, x.shape[0], ADD_CHUNK):  # a few dozen chunks at 4M: progress only
        chunk = np.ascontiguousarray(x[start : start + ADD_CHUNK])
        if lists_by is None:
            index.add(chunk)
        else:
            sphere, augmented = lists_by
            _, nearest = sphere.search(augmented[start : start + ADD_CHUNK], 1)
            lists = np.ascontiguousarray(nearest[:, 0], dtype=np.int64)
            # add_core with the lists given; both arrays stay referenced through the call.
            ivf: Any = index  # the stubs lack add_core
            ivf.add_core(chunk.shape[0], faiss.swig_ptr(chunk), None, faiss.swig_ptr(lists))
        if on_added is not None:
            on_added(chunk.shape[0])


def exact_neighbours(item_vectors: Float32Array, queries: Float32Array, k: int) -> Int64Array:
    """Exact top-``k`` items by inner product for each query (brute force), best first."""
    x = _as_matrix("item_vectors", item_vectors)
    q = _as_matrix("queries", queries, x.shape[1])
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k: expected 1..{x.shape[0]} (the number of items), got {k}")
    _, ids = faiss.knn(q, x, k, metric=faiss.METRIC_INNER_PRODUCT)
    return np.asarray(ids, dtype=np.int64)


def recall_at_k(found: Int64Array, truth: Int64Array) -> float:
    """Share of the true neighbours (ids >= 0 in ``truth``) that appear in ``found``'s row."""
    found = np.asarray(found, dtype=np.int64)
    truth = np.asarray(truth, dtype=np.int64)
    if found.ndim != 2 or truth.ndim != 2 or found.shape[0] != truth.shape[0]:
        raise ValueError(
            f"found {found.shape} and truth {truth.shape}: expected 2-D arrays with one row "
            "per query"
        )
    # Offset every row into its own id range so one np.isin compares rows pairwise.
    span = int(max(found.max(initial=0), truth.max(initial=0))) + 1
    offsets = np.arange(found.shape[0], dtype=np.int64)[:, None] * span
    valid_truth = truth >= 0
    valid_found = np.where(found >= 0, found + offsets, -1)
    hits = np.isin(truth + offsets, valid_found) & valid_truth
    total = int(valid_truth.sum())
    return float(hits.sum() / total) if total else 1.0


def _nlist(index: faiss.Index) -> int:
    ivf = faiss.try_extract_index_ivf(index)
    return 0 if ivf is None else int(ivf.nlist)


def set_search_threads(threads: int) -> None:
    """Let FAISS use ``threads`` threads in the searches the calling thread makes.

    FAISS parallelises a search over its queries with OpenMP, whose thread count belongs to
    the calling thread (a thread inherits the process default, all cores, not another thread's
    setting). A server's batches already run side by side, one batch thread per worker; a
    search of several queries there that also spreads over every core leaves OpenMP's threads
    spinning after the call: on 4M items, in batches of 8, 10% more CPU a request with the
    requests around their homes and 45% more with a batch in one delivery cell
    (benchmarks/README.md, "Sixth round"). So each batch thread calls this once.
    """
    if threads < 1:
        raise ValueError(f"threads is {threads}; expected >= 1")
    faiss.omp_set_num_threads(threads)


def _search(
    index: faiss.Index,
    queries: Float32Array,
    k: int,
    nprobe: int,
    selector: faiss.IDSelector | None,
    nlist: int,
) -> tuple[Float32Array, Int64Array]:
    """One FAISS call; the parameters object holds ``selector`` for the call's duration.
    ``nlist``: the index's list count (0: not IVF), read once by the caller."""
    params: faiss.SearchParameters
    if nlist:
        ivf_params = faiss.SearchParametersIVF()
        ivf_params.nprobe = nprobe
        params = ivf_params
    else:
        params = faiss.SearchParameters()
    if selector is not None:
        params.sel = selector
    distances, ids = index.search(queries, k, params=params)
    return np.asarray(distances, dtype=np.float32), np.asarray(ids, dtype=np.int64)


@dataclass(frozen=True)
class FilteredRecall:
    """recall@``k`` of the retrieve stage with the delivery filter (users at their homes, items
    available and within ``radius_km``), by nprobe: what a request gets. Measured before
    publishing (``recsys.retrieval.retriever.recall_under_filter``)."""

    k: int
    radius_km: float
    queries: int
    by_nprobe: Mapping[int, float]


def recall_ladder(nlist: int, nprobe: int) -> list[int]:
    """The nprobe values a version's recall is measured at: :data:`RECALL_LADDER`, its default
    and every list (exact), capped at ``nlist``; [0] for an exact flat index."""
    return sorted({min(p, nlist) for p in (*RECALL_LADDER, nprobe, nlist)}) if nlist else [0]


def save_index_version(
    root: ArtifactRoot,
    index: faiss.Index,
    item_vectors: Float32Array,
    probe_queries: Float32Array,
    *,
    features_version: str,
    k: int = 200,
    nprobe: int = 16,
    target_recall: float | None = None,
    filtered: Sequence[FilteredRecall] = (),
) -> str:
    """Publish ``index`` under ``root.indexes`` with its probe set and measured recall@k.

    ``probe_queries`` should be a seeded sample of real user vectors: recall on them is what a
    server re-measures before serving. The manifest records recall@k at ``nprobe`` (the
    version's default) and at a ladder of other values. With ``target_recall``, the default is
    raised to the smallest ladder value that reaches it, and, with ``filtered``, that also
    reaches it with the delivery filter at every depth measured (the served K first, then the
    deeper depths experiment arms serve; an nprobe it was not measured at does not). Each
    depth also gets its own smallest nprobe that reaches the target there with the filter
    (``nprobe_by_k`` in the manifest's ``filtered_recall_by_k`` and in the search defaults,
    what a search of that depth uses: :meth:`ItemIndex.nprobe_for`): a shallow K need not pay
    for a deep one's lists. Returns the content-addressed version.
    """
    x = _as_matrix("item_vectors", item_vectors)
    probe = _as_matrix("probe_queries", probe_queries, x.shape[1])
    n, d = x.shape
    if int(index.d) not in (d, d + 1) or int(index.ntotal) != n:
        raise ValueError(
            f"index: holds {int(index.ntotal)} vectors of dimension {int(index.d)}, expected "
            f"{n} x {d} (the item vectors)"
        )
    if nprobe < 1:
        raise ValueError(f"nprobe: expected >= 1, got {nprobe}")
    k = min(k, n)
    truth = exact_neighbours(x, probe, k)
    padded = _query_matrix(index, probe, d)
    nlist = _nlist(index)
    ladder = recall_ladder(nlist, nprobe)
    recall_by_nprobe = {
        p: recall_at_k(_search(index, padded, k, p, None, nlist)[1], truth) for p in ladder
    }

    def reaches(p: int, depths: Sequence[FilteredRecall], unfiltered: bool = True) -> bool:
        assert target_recall is not None
        under_filter = min((f.by_nprobe.get(p, 0.0) for f in depths if nlist), default=1.0)
        plain = recall_by_nprobe[p] if unfiltered else 1.0
        return plain >= target_recall and under_filter >= target_recall

    def smallest_reaching(depths: Sequence[FilteredRecall], unfiltered: bool = True) -> int:
        start = min(nprobe, nlist)
        if target_recall is None or reaches(start, depths, unfiltered):
            return start
        reaching = [p for p in ladder if p > start and reaches(p, depths, unfiltered)]
        return reaching[0] if reaching else ladder[-1]

    default_nprobe = smallest_reaching(filtered)
    # Each measured depth its own, judged by what a search of that depth serves (with the
    # delivery filter; a served search always has one): a shallower K needs fewer lists.
    nprobe_by_k = (
        {f.k: smallest_reaching([f], unfiltered=False) for f in filtered}
        if nlist and target_recall
        else {}
    )
    manifest = {
        "kind": KIND_IVF if nlist else KIND_FLAT,
        "metric": "inner_product",
        "dimension": d,
        "index_dimension": int(index.d),
        "probe_metric": _probe_metric(index),
        "count": n,
        "nlist": nlist,
        "default_nprobe": default_nprobe,
        "recall_k": k,
        "recall": round(recall_by_nprobe[default_nprobe], 6),
        "recall_by_nprobe": {str(p): round(r, 6) for p, r in recall_by_nprobe.items()},
        "probe_queries": int(probe.shape[0]),
        **(
            {
                "filtered_recall_k": filtered[0].k,
                "filtered_radius_km": filtered[0].radius_km,
                "filtered_queries": filtered[0].queries,
                "filtered_recall": round(filtered[0].by_nprobe.get(default_nprobe, 0.0), 6),
                "filtered_recall_by_nprobe": {
                    str(p): round(r, 6) for p, r in sorted(filtered[0].by_nprobe.items())
                },
                "filtered_recall_by_k": {
                    str(f.k): {
                        "recall": round(f.by_nprobe.get(default_nprobe, 0.0), 6),
                        "nprobe": nprobe_by_k.get(f.k, default_nprobe),
                        "recall_at_nprobe": round(
                            f.by_nprobe.get(nprobe_by_k.get(f.k, default_nprobe), 0.0), 6
                        ),
                        "by_nprobe": {str(p): round(r, 6) for p, r in sorted(f.by_nprobe.items())},
                    }
                    for f in filtered
                },
            }
            if filtered and nlist
            else {}
        ),
        "features_version": features_version,
        "faiss_version": faiss.__version__,
    }
    with artifacts.staging(root.indexes) as tmp:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        np.save(tmp / PROBE_FILE, probe, allow_pickle=False)
        np.save(tmp / PROBE_TRUTH_FILE, truth, allow_pickle=False)
        search: dict[str, object] = {"default_nprobe": default_nprobe}
        if nprobe_by_k:
            search["nprobe_by_k"] = {str(k): p for k, p in sorted(nprobe_by_k.items())}
        (tmp / SEARCH_FILE).write_text(json.dumps(search) + "\n")
        version, _ = artifacts.publish(tmp, root.indexes, manifest)
    return version


def _probe_metric(index: faiss.Index) -> str:
    """How the lists to scan are chosen: by inner product with the centroids, or (versions that
    store augmented vectors) by L2 distance to them; "exact" for a flat index."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return "exact"
    return "inner_product" if ivf.quantizer.metric_type == faiss.METRIC_INNER_PRODUCT else "l2"


def _search_defaults(path: Path, name: str) -> tuple[int, dict[int, int]]:
    """The version's default nprobe and its nprobe by depth K (empty in versions published
    before depths had their own)."""
    try:
        search = json.loads(path.read_text())
        value = search["default_nprobe"]
        by_k = search.get("nprobe_by_k", {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise IndexValidationError(
            f"{name}: cannot read default_nprobe from {path.name}: {e}"
        ) from e
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise IndexValidationError(
            f"{name}: {path.name} default_nprobe is {value!r}, expected an integer >= 0"
        )
    if not isinstance(by_k, dict):
        raise IndexValidationError(
            f"{name}: {path.name} nprobe_by_k is {by_k!r}, expected {{depth: nprobe}}"
        )
    out: dict[int, int] = {}
    for k, p in by_k.items():
        if not (isinstance(k, str) and k.isascii() and k.isdecimal() and int(k) >= 1) or (
            isinstance(p, bool) or not isinstance(p, int) or p < 1
        ):
            raise IndexValidationError(
                f"{name}: {path.name} nprobe_by_k has {k!r}: {p!r}, expected a depth >= 1 "
                "and an nprobe >= 1"
            )
        out[int(k)] = p
    return value, out


@dataclass
class ItemIndex:
    """A validated, loaded index version. Searches are thread-safe (no shared mutable state)."""

    version: str
    dimension: int
    count: int
    default_nprobe: int
    manifest: dict[str, Any]
    faiss_index: faiss.Index = field(repr=False)
    measured_recall: float = 0.0
    """recall@k on the version's probe queries, re-measured at load."""
    nprobe_by_k: dict[int, int] = field(default_factory=dict)
    """The nprobe each measured depth K reaches the recall target at, under the delivery
    filter (empty: ``default_nprobe`` for every depth); see :meth:`nprobe_for`."""
    nlist: int = field(init=False)
    """IVF lists (0: exact flat index); read from FAISS once, not on every search."""

    def __post_init__(self) -> None:
        self.nlist = _nlist(self.faiss_index)

    def nprobe_for(self, k: int) -> int:
        """The version's nprobe for a search of depth ``k``: that of the shallowest measured
        depth at least ``k`` (recall at one nprobe falls as K grows, so a deeper depth's
        setting covers a shallower one), else ``default_nprobe`` (it reaches the target at
        every measured depth; a depth beyond them all was never measured)."""
        depth = min((d for d in self.nprobe_by_k if d >= k), default=None)  # two or three
        return self.default_nprobe if depth is None else self.nprobe_by_k[depth]

    @property
    def augmented(self) -> bool:
        """Whether the version stores items with the extra coordinate (built before the lists
        held raw vectors): queries are then padded with a 0 there."""
        return _stores_augmented(self.faiss_index, self.dimension)

    def query_matrix(self, queries: Float32Array) -> Float32Array:
        """``queries`` ([n, dimension]) as the FAISS index takes them."""
        return _query_matrix(self.faiss_index, queries, self.dimension)

    @classmethod
    def load(
        cls,
        directory: Path,
        *,
        expected_dimension: int,
        expected_count: int,
        min_recall: float = 0.9,
    ) -> ItemIndex:
        """Load ``directory`` after checking its files, shape and recall; refuse it otherwise."""
        try:
            manifest = artifacts.verify(directory)
        except ArtifactError as e:
            raise IndexValidationError(f"index {directory.name}: {e}") from e
        name = f"index {manifest.get('version', directory.name)}"
        for key, expected in (("dimension", expected_dimension), ("count", expected_count)):
            if manifest.get(key) != expected:
                raise IndexValidationError(
                    f"{name}: manifest {key} is {manifest.get(key)!r}, expected {expected} "
                    "(the index was built for other item vectors)"
                )
        # IO_FLAG_MMAP_IFC maps the vectors (IndexFlat codes, IVF-Flat inverted lists) read-only
        # from the file instead of copying them, for both index kinds built here, so worker
        # processes share the page cache. The older IO_FLAG_MMAP only covers IVF lists.
        try:
            index = faiss.read_index(str(directory / INDEX_FILE), faiss.IO_FLAG_MMAP_IFC)
        except RuntimeError as e:
            raise IndexValidationError(f"{name}: cannot read {INDEX_FILE}: {e}") from e
        if (
            int(index.d) not in (expected_dimension, expected_dimension + 1)
            or int(index.ntotal) != expected_count
        ):
            raise IndexValidationError(
                f"{name}: {INDEX_FILE} holds {int(index.ntotal)} vectors of dimension "
                f"{int(index.d)}, expected {expected_count} x {expected_dimension} (the item "
                "vectors; older versions: one extra coordinate)"
            )
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.make_direct_map()  # reconstruct() by id; an int64 per item, in process memory
        default_nprobe, nprobe_by_k = _search_defaults(directory / SEARCH_FILE, name)
        loaded = cls(
            version=str(manifest.get("version", directory.name)),
            dimension=expected_dimension,
            count=expected_count,
            default_nprobe=default_nprobe,
            manifest=manifest,
            faiss_index=index,
            nprobe_by_k=nprobe_by_k,
        )
        probe = np.load(directory / PROBE_FILE, allow_pickle=False)
        truth = np.load(directory / PROBE_TRUTH_FILE, allow_pickle=False)
        _, found = loaded.search(probe, int(truth.shape[1]))
        loaded.measured_recall = recall_at_k(found, truth)
        if loaded.measured_recall < min_recall:
            raise IndexValidationError(
                f"{name}: recall@{truth.shape[1]} on {truth.shape[0]} probe queries is "
                f"{loaded.measured_recall:.3f} at nprobe={loaded.default_nprobe}, "
                f"expected >= {min_recall}"
            )
        return loaded

    def search(
        self,
        queries: Float32Array,
        k: int,
        *,
        nprobe: int | None = None,
        allowed: AvailabilitySelector | None = None,
    ) -> tuple[Float32Array, Int64Array]:
        """Top-``k`` items for every query row in one FAISS call, best first.

        ``allowed`` filters inside the search (FAISS skips items outside it), so a heavy filter
        does not empty the result. Rows hold id -1 where fewer than ``k`` items qualify.
        """
        q = _query_matrix(self.faiss_index, queries, self.dimension)
        if k < 1:
            raise ValueError(f"k: expected >= 1, got {k}")
        probe = self.default_nprobe if nprobe is None else nprobe
        if self.nlist and probe < 1:
            raise ValueError(f"nprobe: expected >= 1, got {probe}")
        selector = None
        if allowed is not None:
            if allowed.size != self.count:
                raise ValueError(
                    f"allowed: selector covers {allowed.size} items, index has {self.count}"
                )
            selector = allowed.faiss_selector
        return _search(self.faiss_index, q, k, min(probe, self.nlist), selector, self.nlist)

    def reconstruct(self, ids: Int64Array) -> Float32Array:
        """The stored vectors of ``ids`` (catalogue rows), shape [len(ids), dimension]."""
        rows = np.ascontiguousarray(ids, dtype=np.int64)
        if rows.size == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        stored = self.faiss_index.reconstruct_batch(rows)
        return np.ascontiguousarray(stored[:, : self.dimension], dtype=np.float32)
