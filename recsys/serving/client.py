"""A tiny Recommend client, used by ``recsys recommend`` and the README."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from recsys.serving.routing import user_metadata
from recsys.v1 import recommender_pb2, recommender_pb2_grpc


def build_request(
    user_id: str,
    *,
    num_results: int = 0,
    lat: float | None = None,
    lon: float | None = None,
    surface: str = "",
    platform: str = "",
    request_id: str = "",
    exclude_sku_ids: Sequence[int] = (),
) -> recommender_pb2.RecommendRequest:
    if (lat is None) != (lon is None):
        raise ValueError("lat and lon go together: give both or neither")
    location = None if lat is None or lon is None else recommender_pb2.Location(lat=lat, lon=lon)
    return recommender_pb2.RecommendRequest(
        user_id=user_id,
        num_results=num_results,
        location=location,
        surface=surface,
        platform=platform,
        request_id=request_id,
        exclude_sku_ids=exclude_sku_ids,
    )


def response_to_dict(response: recommender_pb2.RecommendResponse) -> dict[str, Any]:
    """The response as plain JSON-ready data, proto field names, defaults included."""
    return MessageToDict(
        response,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )


def open_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    *,
    server_name: str = "",
) -> grpc.Channel:
    """A channel to ``target``: TLS with ``credentials`` (serving/tls.py
    ``channel_credentials``), else plaintext. ``server_name``: the name to check the server's
    certificate against when it is not the target's host (e.g. a pod IP)."""
    if credentials is None:
        return grpc.insecure_channel(target)
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(target, credentials, options=options)


def recommend(
    target: str,
    request: recommender_pb2.RecommendRequest,
    *,
    timeout: float = 5.0,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str = "",
) -> recommender_pb2.RecommendResponse:
    """One Recommend call over a fresh channel to ``target`` ("host:port"), with the user
    header the balancers route on (serving/routing.py)."""
    with open_channel(target, credentials, server_name=server_name) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        return stub.Recommend(request, timeout=timeout, metadata=user_metadata(request.user_id))


def health_status(
    target: str,
    *,
    service: str = "",
    timeout: float = 3.0,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str = "",
) -> str:
    """The standard health service's status name for ``service`` (e.g. "SERVING")."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with open_channel(target, credentials, server_name=server_name) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
