from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.artifacts import ArtifactRoot, read_manifest
from recsys.retrieval.availability import AvailabilitySelector
from recsys.retrieval.index import (
    EXACT_BELOW,
    KMEANS_ITERATIONS,
    MAX_NLIST,
    MIN_POINTS_PER_LIST,
    TRAIN_POINTS_PER_LIST,
    FilteredRecall,
    IndexValidationError,
    ItemIndex,
    _search_defaults,
    augment_items,
    build_index,
    default_nlist,
    exact_neighbours,
    pad_queries,
    recall_at_k,
    recall_ladder,
    save_index_version,
)
from recsys.types import Float32Array

N_ITEMS = 5_000
DIM = 16
NLIST = 64


def clustered(rng: np.random.Generator, n: int, d: int, clusters: int) -> Float32Array:
    """Vectors around random centres: the structure IVF exploits (and MF vectors have)."""
    centres = rng.normal(size=(clusters, d))
    points = centres[rng.integers(0, clusters, n)] + 0.4 * rng.normal(size=(n, d))
    return points.astype(np.float32)


@pytest.fixture(scope="module")
def items() -> Float32Array:
    return clustered(np.random.default_rng(1), N_ITEMS, DIM, 40)


@pytest.fixture(scope="module")
def users() -> Float32Array:
    return clustered(np.random.default_rng(2), 300, DIM, 40)


@pytest.fixture(scope="module")
def ivf(items: Float32Array) -> faiss.Index:
    return build_index(items, seed=3, nlist=NLIST)


@pytest.fixture(scope="module")
def published(
    tmp_path_factory: pytest.TempPathFactory,
    ivf: faiss.Index,
    items: Float32Array,
    users: Float32Array,
) -> Path:
    root = ArtifactRoot(tmp_path_factory.mktemp("artifacts"))
    version = save_index_version(root, ivf, items, users[:64], features_version="feat1", k=50)
    return root.indexes / version


def load(directory: Path, **overrides: float) -> ItemIndex:
    kwargs: dict[str, float] = {
        "expected_dimension": DIM,
        "expected_count": N_ITEMS,
        "min_recall": 0.9,
    }
    kwargs.update(overrides)
    return ItemIndex.load(
        directory,
        expected_dimension=int(kwargs["expected_dimension"]),
        expected_count=int(kwargs["expected_count"]),
        min_recall=kwargs["min_recall"],
    )


def test_small_catalogue_gets_exact_flat_index(items: Float32Array) -> None:
    index = build_index(items)
    assert N_ITEMS < EXACT_BELOW
    assert faiss.try_extract_index_ivf(index) is None
    assert (index.ntotal, index.d) == (N_ITEMS, DIM)  # the raw vectors


def older_layout(items: Float32Array, seed: int, nlist: int) -> faiss.Index:
    """An IVF index as versions built before raw lists were: the augmented vectors stored,
    trained the same way (sample, seed, iterations), lists chosen by L2 distance."""
    augmented = augment_items(items)
    index = faiss.IndexIVFFlat(
        faiss.IndexFlatL2(DIM + 1), DIM + 1, nlist, faiss.METRIC_INNER_PRODUCT
    )
    index.cp.spherical = False
    index.cp.seed = seed
    index.cp.niter = KMEANS_ITERATIONS
    n_train = nlist * TRAIN_POINTS_PER_LIST
    rows = np.sort(np.random.default_rng(seed).choice(len(items), size=n_train, replace=False))
    index.train(augmented[rows])
    index.add(augmented)
    return index


def test_ivf_lists_are_the_sphere_clusters_and_probes_go_by_inner_product(
    ivf: faiss.Index, items: Float32Array, users: Float32Array
) -> None:
    """k-means runs on the augmented items (all of norm M) and each item sits in the list of
    its nearest centroid there, as before; the lists hold the raw vectors and the coarse
    quantizer the centroids' first DIM coordinates, searched by inner product."""
    lists: Any = faiss.extract_index_ivf(ivf)
    assert (ivf.ntotal, ivf.d) == (N_ITEMS, DIM)
    assert lists.quantizer.metric_type == faiss.METRIC_INNER_PRODUCT
    older: Any = older_layout(items, seed=3, nlist=NLIST)
    assert np.allclose(
        lists.quantizer.reconstruct_n(0, NLIST), older.quantizer.reconstruct_n(0, NLIST)[:, :DIM]
    )
    for index in (lists, older):
        index.make_direct_map()
    list_of = faiss.vector_to_array(lists.direct_map.array) >> 32
    assert np.array_equal(list_of, faiss.vector_to_array(older.direct_map.array) >> 32)
    centroids = lists.quantizer.reconstruct_n(0, NLIST)
    probes = lists.quantizer.search(users[:8], 4)[1]
    assert np.array_equal(probes, np.argsort(-(users[:8] @ centroids.T), axis=1)[:, :4])
    assert np.array_equal(lists.reconstruct_batch(np.arange(0, N_ITEMS, 7)), items[::7])


def test_a_version_of_the_older_layout_still_loads_and_searches_padded(
    tmp_path: Path, items: Float32Array, users: Float32Array
) -> None:
    older = older_layout(items, seed=3, nlist=NLIST)
    root = ArtifactRoot(tmp_path)
    version = save_index_version(root, older, items, users[:64], features_version="f", k=50)
    manifest = read_manifest(root.indexes / version)
    assert (manifest["index_dimension"], manifest["probe_metric"]) == (DIM + 1, "l2")
    loaded = load(root.indexes / version)
    assert loaded.augmented
    scores, ids = loaded.search(users, 30)
    params = faiss.SearchParametersIVF()
    params.nprobe = loaded.default_nprobe
    want_scores, want_ids = older.search(pad_queries(users, DIM), 30, params=params)
    assert np.array_equal(ids, want_ids)
    assert np.allclose(scores, want_scores)
    assert np.array_equal(loaded.reconstruct(ids[0]), items[ids[0]])


def in_memory(index: faiss.Index) -> ItemIndex:
    return ItemIndex("test", DIM, N_ITEMS, 16, {}, index)


def test_ivf_recall_against_exact_search(
    ivf: faiss.Index, items: Float32Array, users: Float32Array
) -> None:
    truth = exact_neighbours(items, users, 100)
    recalls = []
    for nprobe in (1, 4, 16, NLIST):
        _, found = in_memory(ivf).search(users, 100, nprobe=nprobe)
        recalls.append(recall_at_k(found, truth))
    assert recalls == sorted(recalls), recalls
    assert recalls[0] < 0.9  # one list is not enough: the measurement can tell them apart
    assert recalls[2] >= 0.95
    assert recalls[3] == pytest.approx(1.0, abs=1e-3)  # every list probed is an exact scan


def test_exact_neighbours_match_brute_force(items: Float32Array, users: Float32Array) -> None:
    found = exact_neighbours(items, users[:20], 10)
    scores = users[:20].astype(np.float64) @ items.T.astype(np.float64)
    expected = np.argsort(-scores, axis=1)[:, :10]
    assert found.dtype == np.int64
    assert recall_at_k(found, expected) == 1.0


def test_build_is_deterministic(items: Float32Array) -> None:
    a = faiss.serialize_index(build_index(items, seed=5, nlist=32))
    b = faiss.serialize_index(build_index(items, seed=5, nlist=32))
    c = faiss.serialize_index(build_index(items, seed=6, nlist=32))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_build_rejects_bad_input(items: Float32Array) -> None:
    with pytest.raises(ValueError, match=r"nlist: expected 1\.\.5000"):
        build_index(items, nlist=N_ITEMS + 1)
    with pytest.raises(ValueError, match="item_vectors: expected a non-empty 2-D"):
        build_index(items[0])
    bad = items.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build_index(bad)


@settings(deadline=None)
@given(st.integers(min_value=1, max_value=50_000_000))
def test_default_nlist_is_trainable_and_bounded(n: int) -> None:
    nlist = default_nlist(n)
    assert 1 <= nlist <= MAX_NLIST
    assert nlist <= max(1, n // MIN_POINTS_PER_LIST)


@settings(max_examples=200, deadline=None)  # no timing on a shared machine
@given(st.data())
def test_recall_at_k_counts_shared_ids_per_row(data: st.DataObject) -> None:
    rows = data.draw(st.integers(1, 5))
    k = data.draw(st.integers(1, 8))
    ids = st.lists(st.integers(-1, 30), min_size=k, max_size=k)
    found = np.array([data.draw(ids) for _ in range(rows)], dtype=np.int64)
    truth = np.array(
        [data.draw(st.permutations(range(30)))[:k] for _ in range(rows)], dtype=np.int64
    )
    hits = sum(len(set(f) & set(t)) for f, t in zip(found.tolist(), truth.tolist(), strict=True))
    assert recall_at_k(found, truth) == pytest.approx(hits / truth.size)
    assert recall_at_k(truth, truth) == 1.0
    assert recall_at_k(truth[:, ::-1], truth) == 1.0


def test_save_and_load_round_trip(
    published: Path, ivf: faiss.Index, items: Float32Array, users: Float32Array
) -> None:
    manifest = read_manifest(published)
    assert manifest["kind"] == "ivf_flat_ip"
    assert manifest["dimension"] == DIM
    assert manifest["count"] == N_ITEMS
    assert manifest["nlist"] == NLIST
    assert manifest["default_nprobe"] == 16
    assert manifest["recall_k"] == 50
    assert manifest["features_version"] == "feat1"
    assert manifest["faiss_version"] == faiss.__version__
    assert sorted(manifest["files"]) == [
        "index.faiss",
        "probe.npy",
        "probe_truth.npy",
        "search.json",
    ]

    loaded = load(published)
    assert loaded.version == published.name == manifest["version"]
    assert loaded.nlist == NLIST
    assert loaded.measured_recall == pytest.approx(manifest["recall"], abs=1e-6)
    assert manifest["recall"] >= 0.9

    scores, ids = loaded.search(users, 30)
    params = faiss.SearchParametersIVF()
    params.nprobe = 16
    want_scores, want_ids = ivf.search(users, 30, params=params)
    assert np.array_equal(ids, want_ids)
    assert np.allclose(scores, want_scores)
    # the scores are the plain inner products
    assert np.allclose(scores, np.einsum("qd,qkd->qk", users, items[ids]), atol=1e-5)
    assert np.array_equal(loaded.reconstruct(ids[0]), items[ids[0]])  # IVF-Flat stores them as is


def test_publishing_the_same_index_again_gives_the_same_version(
    published: Path, ivf: faiss.Index, items: Float32Array, users: Float32Array
) -> None:
    root = ArtifactRoot(published.parent.parent)
    again = save_index_version(root, ivf, items, users[:64], features_version="feat1", k=50)
    assert again == published.name


def test_another_default_nprobe_is_another_version(
    published: Path, ivf: faiss.Index, items: Float32Array, users: Float32Array
) -> None:
    root = ArtifactRoot(published.parent.parent)
    other = save_index_version(
        root, ivf, items, users[:64], features_version="feat1", k=50, nprobe=32
    )
    assert other != published.name
    assert load(root.indexes / other).default_nprobe == 32
    assert load(published).default_nprobe == 16


def test_load_refuses_a_corrupted_file(published: Path, tmp_path: Path) -> None:
    copy = tmp_path / published.name
    copy.mkdir()
    for f in published.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    raw = bytearray((copy / "index.faiss").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (copy / "index.faiss").write_bytes(bytes(raw))
    with pytest.raises(IndexValidationError, match=r"changed \['index.faiss'\]"):
        load(copy)


def test_load_refuses_wrong_dimension_or_count(published: Path) -> None:
    with pytest.raises(IndexValidationError, match="manifest dimension is 16, expected 32"):
        load(published, expected_dimension=32)
    with pytest.raises(IndexValidationError, match="manifest count is 5000, expected 4000"):
        load(published, expected_count=4_000)


def test_load_refuses_an_index_file_that_disagrees_with_its_manifest(
    published: Path, tmp_path: Path, items: Float32Array
) -> None:
    """A manifest that lies about the shape (hashes rewritten to match) is still caught."""
    copy = tmp_path / published.name
    copy.mkdir()
    for f in published.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    faiss.write_index(build_index(items[:4_000]), str(copy / "index.faiss"))
    manifest = json.loads((copy / "manifest.json").read_text())
    from recsys.artifacts import sha256_file

    manifest["files"]["index.faiss"] = sha256_file(copy / "index.faiss")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexValidationError, match=r"holds 4000 vectors .* expected 5000 x 16"):
        load(copy)


def test_load_refuses_recall_below_the_minimum(
    tmp_path: Path, ivf: faiss.Index, items: Float32Array, users: Float32Array
) -> None:
    root = ArtifactRoot(tmp_path)
    version = save_index_version(
        root, ivf, items, users[:64], features_version="feat1", k=50, nprobe=1
    )
    recall = read_manifest(root.indexes / version)["recall"]
    assert recall < 0.9  # one probed list out of 64 really does miss neighbours
    with pytest.raises(IndexValidationError, match=r"recall@50 on 64 probe queries is 0\.\d+"):
        load(root.indexes / version)
    assert load(root.indexes / version, min_recall=recall - 0.01).measured_recall == pytest.approx(
        recall, abs=1e-6
    )


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_switched_off_items_are_never_returned_even_with_k_near_n(
    kind: str, ivf: faiss.Index, items: Float32Array, users: Float32Array, tmp_path: Path
) -> None:
    index = build_index(items) if kind == "flat" else ivf
    root = ArtifactRoot(tmp_path)
    version = save_index_version(root, index, items, users[:16], features_version="f", nprobe=NLIST)
    loaded = load(root.indexes / version)
    mask = np.random.default_rng(4).random(N_ITEMS) < 0.3
    allowed = AvailabilitySelector(mask)
    k = N_ITEMS - 10
    scores, ids = loaded.search(users[:4], k, allowed=allowed)
    returned = ids[ids >= 0]
    assert mask[returned].all()
    # every allowed item comes back exactly once per query, then -1 padding
    assert ((ids >= 0).sum(axis=1) == mask.sum()).all()
    for row in ids:
        valid = row[row >= 0]
        assert np.unique(valid).size == valid.size
    assert np.isfinite(scores[ids >= 0]).all()
    assert (np.diff(scores[0, : mask.sum()]) <= 0).all()


def test_search_rejects_mismatched_inputs(published: Path, users: Float32Array) -> None:
    loaded = load(published)
    with pytest.raises(ValueError, match="queries: expected dimension 16, got 8"):
        loaded.search(users[:, :8], 10)
    with pytest.raises(ValueError, match="k: expected >= 1"):
        loaded.search(users, 0)
    with pytest.raises(ValueError, match="allowed: selector covers 10 items, index has 5000"):
        loaded.search(users, 5, allowed=AvailabilitySelector(np.ones(10, dtype=np.bool_)))


def test_augmented_items_all_have_the_largest_norm(items: Float32Array) -> None:
    augmented = augment_items(items)
    norms = np.linalg.norm(augmented, axis=1)
    assert np.allclose(norms, np.linalg.norm(items, axis=1).max(), rtol=1e-5)
    assert np.array_equal(augmented[:, :DIM], items)
    padded = pad_queries(items[:3], DIM)
    assert np.allclose(padded @ augmented.T, items[:3] @ items.T, atol=1e-4)


def test_a_target_recall_raises_the_default_nprobe(
    tmp_path: Path, ivf: faiss.Index, items: Float32Array, users: Float32Array
) -> None:
    root = ArtifactRoot(tmp_path)
    version = save_index_version(
        root, ivf, items, users[:64], features_version="f", k=50, nprobe=1, target_recall=0.97
    )
    manifest = read_manifest(root.indexes / version)
    ladder = {int(p): r for p, r in manifest["recall_by_nprobe"].items()}
    assert ladder[1] < 0.97
    reaching = [p for p in sorted(ladder) if ladder[p] >= 0.97]
    assert manifest["default_nprobe"] == reaching[0] > 1
    assert manifest["recall"] == ladder[reaching[0]]
    assert load(root.indexes / version, min_recall=0.97).default_nprobe == reaching[0]


def _unfiltered_choice(
    root: ArtifactRoot, ivf: faiss.Index, items: Float32Array, users: Float32Array
) -> dict[str, Any]:
    """The manifest of a version published with a target of 0.9 and no filtered recall."""
    version = save_index_version(
        root, ivf, items, users[:64], features_version="f", k=50, nprobe=1, target_recall=0.9
    )
    return read_manifest(root.indexes / version)


def test_a_filtered_recall_below_the_target_raises_the_default_nprobe_further(
    tmp_path: Path, ivf: faiss.Index, items: Float32Array, users: Float32Array
) -> None:
    root = ArtifactRoot(tmp_path)
    plain = _unfiltered_choice(root, ivf, items, users)
    unfiltered_choice = plain["default_nprobe"]
    later = [p for p in recall_ladder(NLIST, 1) if p > unfiltered_choice]
    # With the filter, the unfiltered choice and the next ladder value fall short; the one
    # after reaches the target; an nprobe not measured under the filter never counts.
    by_nprobe = {unfiltered_choice: 0.85, later[0]: 0.88, later[1]: 0.96}
    filtered = FilteredRecall(k=20, radius_km=8.0, queries=64, by_nprobe=by_nprobe)
    version = save_index_version(
        root, ivf, items, users[:64], features_version="f", k=50, nprobe=1, target_recall=0.9,
        filtered=[filtered],
    )  # fmt: skip
    manifest = read_manifest(root.indexes / version)
    assert manifest["default_nprobe"] == later[1]
    assert manifest["filtered_recall"] == 0.96
    assert manifest["filtered_recall_k"] == 20
    assert manifest["filtered_radius_km"] == 8.0
    assert manifest["filtered_recall_by_nprobe"][str(later[0])] == 0.88
    # A deeper served K (an experiment arm's) that falls short where the served K reaches the
    # target moves the default further; the manifest keeps each depth's ladder.
    served = FilteredRecall(20, 8.0, 64, {**by_nprobe, later[2]: 0.97})
    deeper = FilteredRecall(40, 8.0, 64, {later[1]: 0.86, later[2]: 0.92})
    version = save_index_version(
        root, ivf, items, users[:64], features_version="f", k=50, nprobe=1, target_recall=0.9,
        filtered=[served, deeper],
    )  # fmt: skip
    manifest = read_manifest(root.indexes / version)
    assert manifest["default_nprobe"] == later[2]
    assert manifest["filtered_recall_k"] == 20  # the served K's figures stay where they were
    assert manifest["filtered_recall"] == 0.97
    assert manifest["filtered_recall_by_k"]["40"]["recall"] == 0.92
    assert manifest["filtered_recall_by_k"]["40"]["by_nprobe"][str(later[1])] == 0.86


def test_each_measured_depth_gets_the_smallest_nprobe_that_reaches_the_target_there(
    tmp_path: Path, ivf: faiss.Index, items: Float32Array, users: Float32Array
) -> None:
    root = ArtifactRoot(tmp_path)
    plain = _unfiltered_choice(root, ivf, items, users)
    later = [p for p in recall_ladder(NLIST, 1) if p > plain["default_nprobe"]]
    shallow = FilteredRecall(20, 8.0, 64, {later[0]: 0.93, later[1]: 0.95, later[2]: 0.97})
    deep = FilteredRecall(40, 8.0, 64, {later[0]: 0.85, later[1]: 0.89, later[2]: 0.92})
    version = save_index_version(
        root, ivf, items, users[:64], features_version="f", k=50, nprobe=1, target_recall=0.9,
        filtered=[shallow, deep],
    )  # fmt: skip
    manifest = read_manifest(root.indexes / version)
    assert manifest["default_nprobe"] == later[2]  # reaches it at every depth
    assert manifest["filtered_recall_by_k"]["20"]["nprobe"] == later[0]
    assert manifest["filtered_recall_by_k"]["20"]["recall_at_nprobe"] == 0.93
    assert manifest["filtered_recall_by_k"]["40"]["nprobe"] == later[2]
    search = json.loads((root.indexes / version / "search.json").read_text())
    assert search["nprobe_by_k"] == {"20": later[0], "40": later[2]}
    loaded = load(root.indexes / version, min_recall=0.9)
    assert loaded.nprobe_by_k == {20: later[0], 40: later[2]}
    # A depth uses the shallowest measured depth at least as deep; beyond them, the default.
    assert [loaded.nprobe_for(k) for k in (1, 20, 21, 40, 41)] == [
        later[0], later[0], later[2], later[2], later[2]
    ]  # fmt: skip
    # A depth is judged by its filtered recall alone (a served search always has the filter):
    # one list can be its setting though recall without the filter falls short there.
    assert plain["recall_by_nprobe"]["1"] < 0.9
    shallow = FilteredRecall(20, 8.0, 64, {1: 0.91, later[0]: 0.93, later[2]: 0.97})
    version = save_index_version(
        root, ivf, items, users[:64], features_version="f", k=50, nprobe=1, target_recall=0.9,
        filtered=[shallow, deep],
    )  # fmt: skip
    manifest = read_manifest(root.indexes / version)
    assert manifest["filtered_recall_by_k"]["20"]["nprobe"] == 1
    assert manifest["default_nprobe"] == later[2]


def test_a_version_without_depth_settings_searches_every_depth_at_its_default(
    ivf: faiss.Index,
) -> None:
    index = ItemIndex(
        version="v", dimension=DIM, count=N_ITEMS, default_nprobe=7, manifest={}, faiss_index=ivf
    )
    assert [index.nprobe_for(k) for k in (1, 200, 10_000)] == [7, 7, 7]


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ({"default_nprobe": 8, "nprobe_by_k": {"200": 0}}, "nprobe_by_k has '200': 0"),
        ({"default_nprobe": 8, "nprobe_by_k": {"deep": 4}}, "nprobe_by_k has 'deep': 4"),
        ({"default_nprobe": 8, "nprobe_by_k": {"²": 4}}, "nprobe_by_k has '²': 4"),
        ({"default_nprobe": 8, "nprobe_by_k": [4]}, "nprobe_by_k is \\[4\\]"),
    ],
)
def test_bad_depth_settings_are_refused_naming_them(
    tmp_path: Path, search: dict[str, Any], message: str
) -> None:
    path = tmp_path / "search.json"
    path.write_text(json.dumps(search))
    with pytest.raises(IndexValidationError, match=message):
        _search_defaults(path, "index v")
