"""POST /v1/recommend: the same Recommend as gRPC over HTTP/JSON, on a real socket."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import json_format

from recsys.serving.batching import Overloaded
from recsys.serving.rest import HEALTH_PATH, RECOMMEND_PATH, TIMEOUT_HEADER, RestServer
from recsys.serving.server import RunningServer
from recsys.serving.wire import to_response
from tests.serving.test_servicer import (
    FULL,
    ScriptedPipeline,
    Standalone,
    counted,
    failure,
    scripted,
    settings_for,
    standalone,
)


@contextlib.asynccontextmanager
async def rest_beside(served: Standalone) -> AsyncIterator[aiohttp.ClientSession]:
    """A RestServer on the standalone's service, on any free port, and a session to it."""
    rest = RestServer(served.service)
    port = await rest.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
            yield session
    finally:
        await rest.stop()


async def post(
    session: aiohttp.ClientSession, body: object, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    kwargs: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
    async with session.post(RECOMMEND_PATH, headers=headers, **kwargs) as reply:
        return reply.status, await reply.json()


async def test_the_proto_json_in_and_out_counted_and_recorded(tmp_path: Path) -> None:
    pipeline = ScriptedPipeline(FULL)
    async with (
        standalone(tmp_path, pipeline, hour=lambda: 19) as served,
        rest_beside(served) as session,
    ):
        status, body = await post(session, {"userId": "dana", "requestId": "r-1", "numResults": 3})
        # proto field names are accepted too, int64 as strings or numbers
        status2, _ = await post(session, {"user_id": "dana", "exclude_sku_ids": ["7", 9]})
    assert (status, status2) == (200, 200)
    expected = json_format.MessageToDict(to_response(replace(FULL, request_id="r-1")))
    assert body == expected
    assert body["items"][2]["skuId"] == "1000000000123"  # canonical JSON: int64 as a string
    (request, _), (second, _) = pipeline.calls
    assert request.user_id == "dana"
    assert request.num_results == 3
    assert list(second.exclude_sku_ids) == [7, 9]
    assert counted(served.metrics, "OK") == 2  # the same metrics as gRPC
    first, _second = served.exposure_lines()  # and the same exposure record
    assert first["request_id"] == "r-1"
    assert first["hour"] == 19


async def test_bad_requests_get_the_grpc_messages_as_400(tmp_path: Path) -> None:
    async with standalone(tmp_path, ScriptedPipeline(FULL)) as served:
        grpc_error = await failure(lambda: served.recommend(user_id="", request_id="x"))
        async with rest_beside(served) as session:
            empty = await post(session, {"userId": "", "requestId": "x"})
            unknown = await post(session, {"userId": "dana", "numResultz": 3})
            not_json = await post(session, b"{not json")
            not_object = await post(session, [1, 2])
            bad_type = await post(session, {"userId": "dana", "numResults": "many"})
            bad_timeout = await post(session, {"userId": "dana"}, {TIMEOUT_HEADER: "soon"})
    assert grpc_error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert empty == (400, {"code": "INVALID_ARGUMENT", "message": grpc_error.details()})
    for status, body in (unknown, not_json, not_object, bad_type, bad_timeout):
        assert status == 400
        assert body["code"] == "INVALID_ARGUMENT"
        assert "\n" not in body["message"]
    assert "numResultz" in unknown[1]["message"]
    assert "numResults" in bad_type[1]["message"]
    assert TIMEOUT_HEADER in bad_timeout[1]["message"]
    assert counted(served.metrics, "INVALID_ARGUMENT") == 1 + 6  # the gRPC call and six posts


@pytest.mark.parametrize(
    ("answer", "status", "code"),
    [
        (Overloaded("the batch queue is full"), 429, "RESOURCE_EXHAUSTED"),
        (RuntimeError("a bug"), 500, "INTERNAL"),
    ],
)
async def test_failures_map_to_http_statuses(
    tmp_path: Path, answer: Exception, status: int, code: str
) -> None:
    async with (
        standalone(tmp_path, ScriptedPipeline(answer)) as served,
        rest_beside(served) as session,
    ):
        got = await post(session, {"userId": "dana", "requestId": "f-1"})
    assert got[0] == status
    assert got[1]["code"] == code
    assert "f-1" in got[1]["message"]
    assert counted(served.metrics, code) == 1


async def test_loading_is_503_and_a_deadline_is_passed_down(tmp_path: Path) -> None:
    async with standalone(tmp_path, None) as served, rest_beside(served) as session:
        loading = await post(session, {"userId": "dana"})
        async with session.get(HEALTH_PATH) as reply:
            health = reply.status
    assert loading[0] == 503
    assert loading[1]["code"] == "UNAVAILABLE"
    assert health == 503
    pipeline = ScriptedPipeline(FULL)
    async with standalone(tmp_path, pipeline) as served, rest_beside(served) as session:
        status, _ = await post(session, {"userId": "dana"}, {TIMEOUT_HEADER: "250"})
        async with session.get(HEALTH_PATH) as reply:
            health = reply.status
    assert (status, health) == (200, 200)
    ((_, deadline),) = pipeline.calls
    assert deadline is not None


async def test_off_by_default_and_on_its_own_port_when_asked(tmp_path: Path) -> None:
    pipeline = ScriptedPipeline(FULL)
    off = await RunningServer.start(settings_for(tmp_path), scripted(pipeline))
    try:
        assert off.rest is None
        assert off.http_port is None
    finally:
        await off.stop()
    settings = replace(settings_for(tmp_path), http_port=0)
    on = await RunningServer.start(settings, scripted(pipeline))
    try:
        await on.wait_ready()
        assert on.http_port not in (None, on.port, on.metrics_port)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{on.http_port}") as session:
            status, body = await post(session, {"userId": "ann"})
        assert status == 200
        assert len(body["items"]) == len(FULL.items)
        assert on.metrics.registry.get_sample_value("recsys_requests_total", {"code": "OK"}) == 1
    finally:
        await on.stop()
