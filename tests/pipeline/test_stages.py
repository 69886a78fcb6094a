"""The stage list: its order, and a new stage added with one class and one line, seen in /metrics
through a real server and a real gRPC call."""

from __future__ import annotations

import threading
from dataclasses import replace
from functools import partial
from pathlib import Path

import faiss
import grpc
import pytest

from recsys.experiments.stage import Assign
from recsys.pipeline.snapshot import ServingSnapshot
from recsys.pipeline.stages import StagePlan, build_stages
from recsys.serving.pipeline import open_pipeline
from recsys.serving.server import RunningServer
from recsys.settings import ServeSettings
from recsys.stage import Batch
from recsys.v1 import recommender_pb2, recommender_pb2_grpc
from tests.serving.metrics_page import fetch_metrics


class CountCandidates:
    """A stage that only looks: how many candidates the batch carries after ranking."""

    name = "count_candidates"

    def __init__(self) -> None:
        self.seen: list[int] = []

    def run(self, batch: Batch, snapshot: ServingSnapshot) -> Batch:
        self.seen.append(int(batch.candidate_counts.sum()))
        return batch


async def serve_one(
    artifacts: Path, plan: StagePlan, user_id: str, search_threads: int | None = None
) -> tuple[recommender_pb2.RecommendResponse, str]:
    """A real server with ``plan`` (and ``search_threads`` if given): one Recommend over gRPC,
    then its metrics page."""
    settings = ServeSettings(artifacts=artifacts, port=0, metrics_port=0, drain_seconds=2)
    if search_threads is not None:
        settings = replace(settings, search_threads=search_threads)
    server = await RunningServer.start(settings, partial(open_pipeline, stages=plan))
    try:
        await server.wait_ready()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = recommender_pb2_grpc.RecommenderStub(channel)
            reply = await stub.Recommend(
                recommender_pb2.RecommendRequest(user_id=user_id, num_results=10)
            )
        return reply, fetch_metrics(server.metrics_port)
    finally:
        await server.stop()


def test_the_request_path_is_assign_then_features_retrieve_rank_arrange_capture_monitor() -> None:
    plan = build_stages()
    assert plan.names == ("assign", "features", "retrieve", "rank", "arrange", "capture", "monitor")


async def test_a_new_stage_is_one_object_in_the_list_and_its_timing_reaches_metrics(
    artifacts: Path,
) -> None:
    plan = build_stages()
    tap = CountCandidates()
    plan = replace(plan, batched=(*plan.batched[:-1], tap, plan.batched[-1]))  # the one line
    reply, page = await serve_one(artifacts, plan, "user-0000001")
    assert len(reply.items) == 10
    assert tap.seen, "the stage never ran"
    assert tap.seen[-1] >= 10  # it ran on the served batch, after ranking
    counts = {
        line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
        for line in page.splitlines()
        if line.startswith("recsys_stage_duration_seconds_count{")
    }
    assert counts['stage="count_candidates"'] >= 1
    assert {'stage="assign"', 'stage="features"', 'stage="retrieve"', 'stage="rank"'} <= set(counts)


class OnTheLoop:
    """A per-request stage that records the thread and the batch size it ran with."""

    name = "on_the_loop"

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def run(self, batch: Batch, snapshot: ServingSnapshot) -> Batch:
        self.seen.append((threading.current_thread().name, len(batch)))
        return batch


async def test_a_per_request_stage_runs_on_the_loop_once_per_request_before_batching(
    artifacts: Path,
) -> None:
    """The served plan has no per-request stage; a plan that has one runs it on the event loop
    for each request alone, before the batch."""
    plan = build_stages()
    tap = OnTheLoop()
    plan = replace(plan, per_request=(tap, Assign()))
    reply, page = await serve_one(artifacts, plan, "user-0000002")
    assert len(reply.items) == 10
    assert reply.experiments
    served = tap.seen[-1]  # (warm-up runs the per-request stages too, in a worker thread)
    assert served == (threading.main_thread().name, 1)
    assert 'recsys_stage_duration_seconds_count{stage="on_the_loop"}' in page


class SearchThreads:
    """A batched stage that records its thread and how many threads a FAISS search there uses."""

    name = "search_threads"

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def run(self, batch: Batch, snapshot: ServingSnapshot) -> Batch:
        self.seen.append((threading.current_thread().name, faiss.omp_get_max_threads()))
        return batch


@pytest.mark.parametrize(("setting", "expected"), [(None, 1), (2, 2)])
async def test_batches_search_with_the_configured_faiss_threads(
    artifacts: Path, setting: int | None, expected: int
) -> None:
    """FAISS's thread count belongs to the calling thread: each batch thread sets its own, one
    by default (batches already run side by side), whatever the process default is."""
    plan = build_stages()
    tap = SearchThreads()
    plan = replace(plan, batched=(tap, *plan.batched))
    reply, _ = await serve_one(artifacts, plan, "user-0000003", setting)
    assert len(reply.items) == 10
    thread, threads = tap.seen[-1]
    assert thread.startswith("batch-recommend")
    assert threads == expected
