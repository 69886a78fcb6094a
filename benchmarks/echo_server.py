"""The limit: a grpc.aio server on uvloop answering Recommend with a fixed 20-item feed.

Same service, same messages, same process model as ``recsys serve`` (one process, uvloop), and
no work: what it costs per call is what gRPC and protobuf cost in Python on this machine.

    python -m benchmarks.echo_server --port 50061
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import grpc
import uvloop

from recsys.v1 import recommender_pb2, recommender_pb2_grpc


def fixed_response(num_items: int = 20) -> recommender_pb2.RecommendResponse:
    response = recommender_pb2.RecommendResponse(
        model_version="echo-model", index_version="echo-index", config_version="1"
    )
    response.experiments.add(layer="retrieval", experiment="retrieval-depth", arm="k200", bucket=7)
    for n in range(num_items):
        response.items.add(sku_id=1000 + n, restaurant_id=n, score=1.0 - n / num_items)
    return response


class EchoRecommender(recommender_pb2_grpc.RecommenderServicer):
    def __init__(self) -> None:
        self._response = fixed_response()

    async def Recommend(
        self,
        request: recommender_pb2.RecommendRequest,
        context: grpc.aio.ServicerContext[
            recommender_pb2.RecommendRequest, recommender_pb2.RecommendResponse
        ],
    ) -> recommender_pb2.RecommendResponse:
        response = recommender_pb2.RecommendResponse()
        response.CopyFrom(self._response)
        response.request_id = request.request_id or "echo"
        return response


async def serve_until_signal(
    servicer: recommender_pb2_grpc.RecommenderServicer, host: str, port: int
) -> None:
    """Serve ``servicer`` on ``host:port`` until SIGTERM or SIGINT (prints "serving" once up)."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    recommender_pb2_grpc.add_RecommenderServicer_to_server(servicer, server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("serving", flush=True)
    await stop.wait()
    await server.stop(1)


async def serve(host: str, port: int) -> None:
    await serve_until_signal(EchoRecommender(), host, port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50061)
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
