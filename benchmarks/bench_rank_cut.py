"""Offline quality and batch CPU of each two-phase cut, through the serving code path.

Held-out users' recent sessions (users ``world.heldout_user_mask()`` kept out of training) with a
click are replayed as requests (their user, delivery location and hour) through
``recsys.serving.pipeline.recommend_batch`` under several configurations: retrieval depth K, IVF
nprobe (the index default, or every list: exact) and the rank cut. Each served top-20 is scored with
NDCG@20 against the session's labels (2 ordered, 1 clicked); positives the list missed count in the
ideal DCG, so missing them costs. The reference configuration is exact top-500 retrieval, all 500
scored by the full model. Where few clicked items are retrieved at all (a large catalogue), NDCG has
little resolution; the share of the reference's top 20 that each configuration also serves
(overlap@20) then says how close it stays to the reference. Also reported: the batch function's CPU
per request, with ``--batch`` requests per batch (1: no micro-batching).

    python -m benchmarks.bench_rank_cut --artifacts /tmp/art100 [--sessions 1000] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from recsys.control.backends import open_store
from recsys.pipeline.loading import SnapshotCompiler, artifact_root
from recsys.pipeline.snapshot import ServingSnapshot
from recsys.pipeline.stages import build_stages
from recsys.ranking.evaluation import ndcg_per_group
from recsys.ranking.model_cache import ModelCache
from recsys.serving.control import read_documents
from recsys.serving.pipeline import Job, recommend_batch
from recsys.types import Assignment, Location, PipelineParams, Request

BATCH = 32
NUM_RESULTS = 20


def load_state(artifacts: Path) -> ServingSnapshot:
    store = open_store("", artifacts)
    try:
        docs = read_documents(store, None)
    finally:
        store.close()
    root = artifact_root(artifacts)
    return SnapshotCompiler(root, ModelCache(root)).initial(
        {name: doc.body for name, doc in docs.items()}, "0"
    )


def heldout_sessions(
    state: ServingSnapshot, artifacts: Path, n: int, seed: int
) -> tuple[list[Request], list[dict[int, int]]]:
    """Requests replaying ``n`` held-out clicked sessions, and each session's labels by sku."""
    from recsys.world import load_world

    world_dir = sorted((artifacts / "world").iterdir(), key=lambda p: p.stat().st_mtime)[-1]
    world = load_world(world_dir)
    log = world.log
    rows = np.flatnonzero(~world.history_mask() & world.heldout_user_mask()[log.user])
    label = log.clicked[rows].astype(np.int64) + log.ordered[rows].astype(np.int64)
    session = log.session[rows]
    clicked = np.unique(session[label > 0])
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(clicked, size=min(n, clicked.size), replace=False))
    requests, labels = [], []
    for s in chosen:  # offline replay: one loop per session is fine here
        mine = rows[session == s]
        first = mine[0]
        requests.append(
            Request(
                request_id=f"session-{s}",
                user_id=str(world.users.user_ids[log.user[first]]),
                num_results=NUM_RESULTS,
                location=Location(float(log.lat[first]), float(log.lon[first])),
                hour=int(log.hour[first]),
            )
        )
        gains = log.clicked[mine].astype(np.int64) + log.ordered[mine].astype(np.int64)
        labels.append({int(i): int(g) for i, g in zip(log.item[mine], gains, strict=True) if g})
    return requests, labels


def evaluate(
    state: ServingSnapshot,
    requests: list[Request],
    labels: list[dict[int, int]],
    params: PipelineParams,
    batch: int = BATCH,
) -> tuple[dict[str, float], np.ndarray, list[np.ndarray]]:
    """Mean NDCG@20 and CPU per request, the per-session NDCG (for paired comparisons) and
    the served lists."""
    stages = build_stages().batched  # a fresh rank stage: its own cost account
    served = []
    cpu = 0.0
    for start in range(0, len(requests), batch):
        jobs = [
            Job(r, Assignment((), params, "bench"), state) for r in requests[start : start + batch]
        ]
        t = time.process_time()
        out = recommend_batch(jobs, stages)
        cpu += time.process_time() - t
        for rec in out:
            assert not isinstance(rec, Exception)
            served.append(rec.items.sku_ids)
    all_labels, all_scores, sizes = [], [], []
    for items, truth in zip(served, labels, strict=True):
        got = [truth.get(int(i), 0) for i in items]
        missed = [g for i, g in truth.items() if i not in set(items.tolist())]
        all_labels += got + missed
        all_scores += list(-np.arange(len(got), dtype=np.float64)) + [-1e9] * len(missed)
        sizes.append(len(got) + len(missed))
    ndcg = ndcg_per_group(
        np.array(all_labels), np.array(all_scores), group_sizes=np.array(sizes), k=NUM_RESULTS
    )
    summary = {
        "ndcg@20": float(np.nanmean(ndcg)),
        "batch_cpu_us_per_request": cpu / len(requests) * 1e6,
    }
    return summary, ndcg, served


def overlap(served: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """Mean share of the reference's top 20 that the served top 20 also holds."""
    shares = [
        np.intersect1d(s, r).size / max(r.size, 1) for s, r in zip(served, reference, strict=True)
    ]
    return float(np.mean(shares))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--k", type=int, action="append", help="served retrieval depths")
    parser.add_argument("--cut", type=int, action="append", help="rank cuts (0: no cut)")
    parser.add_argument(
        "--batch", type=int, default=BATCH, help="requests per batch (1: no micro-batching)"
    )
    args = parser.parse_args()
    state = load_state(args.artifacts)
    requests, labels = heldout_sessions(state, args.artifacts, args.sessions, args.seed)
    exact = max(state.index.nlist, 1)
    reference, ref_ndcg, ref_lists = evaluate(
        state, requests, labels, PipelineParams(retrieval_k=500, nprobe=exact, rank_cut=0)
    )
    print(
        json.dumps(
            {"config": "reference: exact top-500, all scored", **reference, "sessions": len(labels)}
        )
    )
    for k in args.k or [200, 400]:
        for cut in args.cut or [0, 20, 50, 100, 150]:
            if cut >= k:
                continue
            params = PipelineParams(retrieval_k=k, rank_cut=cut)
            result, ndcg, lists = evaluate(state, requests, labels, params, args.batch)
            # Paired over the same sessions: the standard error of the ratio's numerator.
            diff = ndcg - ref_ndcg
            row = {
                "config": f"K={k} nprobe=default cut={cut or 'all'} batch={args.batch}",
                **result,
                "ndcg_vs_reference": result["ndcg@20"] / reference["ndcg@20"],
                "ratio_stderr": float(diff.std(ddof=1) / np.sqrt(diff.size)) / reference["ndcg@20"],
                "overlap@20_with_reference": overlap(lists, ref_lists),
            }
            print(
                json.dumps(
                    {key: round(v, 4) if isinstance(v, float) else v for key, v in row.items()}
                )
            )


if __name__ == "__main__":
    main()
